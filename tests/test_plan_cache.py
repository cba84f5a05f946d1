"""The fused module's parts on their own: the dispatch function against the README's table, the plan cache, the
upsampling stages, and the layout's math that the eval-mode backward differentiates."""

from __future__ import annotations

import copy
import dataclasses
import gc
import pathlib
import pickle

import pytest
import torch
from torch import nn

from fastunet import FastUNet, UNet, ops
from fastunet.dispatch import BACKEND_INTERPRETER, BACKEND_REFERENCE, BACKEND_TRITON, dispatch_reason
from fastunet.parity import randomize_norm_stats
from fastunet.plan_cache import PlanCache, Stamp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SMALL = {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}

# -- dispatch ---------------------------------------------------------------------------------------------------------
EVAL = {
    "training": None,
    "grad_enabled": True,
    "hooked": None,
    "global_hooks": False,
    "traced_with_grad": False,
    "device": torch.device("cuda", 0),
    "interpret": False,
}
CPU = torch.device("cpu")
# One call per row of the README's table, keyed by the row's first two cells.
ROWS = {
    ("eval", "CUDA tensor"): EVAL,
    ("eval", "CPU tensor, `TRITON_INTERPRET=1` set before `triton` is imported"): {
        **EVAL,
        "device": CPU,
        "interpret": True,
    },
    ("eval", "CPU tensor otherwise"): {**EVAL, "device": CPU},
    ("eval", "CUDA tensor, `TRITON_INTERPRET=1` set"): {**EVAL, "interpret": True},
    ("train, a layout the backward kernels cover (see Gradients)", "CUDA tensor"): {**EVAL, "training": "the model"},
    (
        "train, a layout the backward kernels cover",
        "CPU tensor, `TRITON_INTERPRET=1` set before `triton` is imported",
    ): {
        **EVAL,
        "training": "the model",
        "device": CPU,
        "interpret": True,
    },
    ("train, any other layout (or a converted model whose training-mode forward is not its layout's)", "any"): {
        **EVAL,
        "training": "the model",
        "backward_blocker": "a converted model runs its source class's own forward in training mode: its "
        "training-mode forward computes something the layout does not",
    },
    ("train, gradients disabled (`torch.no_grad()`, inference mode)", "any"): {
        **EVAL,
        "training": "the model",
        "grad_enabled": False,
    },
    ("eval, inside `torch.compile` with autograd on, a layout the backward kernels do not cover", "any"): {
        **EVAL,
        "traced_with_grad": True,
        "backward_blocker": "enc0.conv1: the leaky_relu activation has no backward kernels yet (ReLU has)",
    },
    ("eval, forward hooks on a submodule", "any"): {**EVAL, "hooked": "encoders.1"},
}


def _readme_dispatch_rows() -> list[list[str]]:
    text = README.read_text()
    section = text[text.index("## Dispatch rules") :]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| mode | input |") and rows[1].startswith("|---")
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def test_dispatch_mirrors_the_readme_table():
    rows = _readme_dispatch_rows()
    assert {(mode, given) for mode, given, _, _ in rows} == set(ROWS), "README rows and the test's calls differ"
    for mode, given, runs, backend in rows:
        decision = dispatch_reason(**ROWS[(mode, given)])
        assert f'`"{decision.backend}"`' == backend, (mode, given, decision)
        assert decision.warn == ("FastUNetFallbackWarning" in runs), (mode, given, decision)


@pytest.mark.parametrize(
    "changes, backend, reason",
    [
        pytest.param({}, BACKEND_TRITON, "eval mode", id="kernels"),
        pytest.param({"device": CPU, "interpret": True}, BACKEND_INTERPRETER, "eval mode", id="interpreter"),
        # Training on a layout without backward kernels comes first: hooks, compilation and the device do not matter.
        pytest.param(
            {"training": "head", "hooked": "head", "traced_with_grad": True, "device": CPU, "backward_blocker": "X"},
            BACKEND_REFERENCE,
            "training mode (head): X",
            id="training-first",
        ),
        # With backward kernels, training goes on to the other rows.
        pytest.param({"training": "head", "hooked": "head"}, BACKEND_REFERENCE, "forward hooks", id="training-hooks"),
        pytest.param(
            {"training": "head", "traced_with_grad": True}, BACKEND_TRITON, "training mode", id="train-compiled"
        ),
        pytest.param(
            {"training": "head", "device": CPU, "interpret": True}, BACKEND_INTERPRETER, "training mode", id="train-cpu"
        ),
        pytest.param(
            {"hooked": "head", "traced_with_grad": True}, BACKEND_REFERENCE, "forward hooks on head", id="hooks-next"
        ),
        pytest.param({"global_hooks": True}, BACKEND_REFERENCE, "forward hooks registered globally", id="global"),
        pytest.param(
            {"traced_with_grad": True, "device": CPU, "backward_blocker": "X"},
            BACKEND_REFERENCE,
            "torch.compile with autograd on: X",
            id="compile",
        ),
        pytest.param({"traced_with_grad": True}, BACKEND_TRITON, "eval mode", id="compile-kernel-grad"),
    ],
)
def test_dispatch_order(changes, backend, reason):
    decision = dispatch_reason(**{**EVAL, **changes})
    assert decision.backend == backend and decision.reason.startswith(reason), decision


# -- plan cache -------------------------------------------------------------------------------------------------------
def _model(**overrides) -> FastUNet:
    model = FastUNet(**{**SMALL, **overrides}).eval()
    randomize_norm_stats(model)
    return model


def _build(model: FastUNet, dtype: torch.dtype = torch.float32):
    builds = []

    def build():
        builds.append(dtype)
        return ops.build_plan(model.fused_layout(), dtype, CPU)

    return build, builds


def test_a_matching_stamp_returns_the_cached_plan():
    model = _model()
    cache = PlanCache()
    build, builds = _build(model)
    first = cache.get(torch.float32, CPU, model._scan().stamp, build)
    assert cache.get(torch.float32, CPU, model._scan().stamp, build) is first
    assert len(builds) == 1 and len(cache) == 1


def test_a_changed_parameter_is_refreshed_into_the_same_plan():
    """Same shapes: the new values are copied into the live plan's tensors (a captured CUDA graph replays them)."""
    model = _model()
    cache = PlanCache()
    build, builds = _build(model)
    plan = cache.get(torch.float32, CPU, model._scan().stamp, build)
    tensors = ops.plan_tensors(plan)
    head_bias = plan.head.bias.clone()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    again = cache.get(torch.float32, CPU, model._scan().stamp, build)
    assert again is plan and len(builds) == 2
    assert all(a is b for a, b in zip(ops.plan_tensors(again), tensors, strict=True))
    torch.testing.assert_close(again.head.bias, head_bias + 1.0)
    assert cache.get(torch.float32, CPU, model._scan().stamp, build) is plan and len(builds) == 2


def test_another_dtype_replaces_the_plan():
    model = _model()
    cache = PlanCache()
    build32, _ = _build(model, torch.float32)
    build16, _ = _build(model, torch.float16)
    plan32 = cache.get(torch.float32, CPU, model._scan().stamp, build32)
    plan16 = cache.get(torch.float16, CPU, model._scan().stamp, build16)
    assert plan16 is not plan32 and plan16.head.weight.dtype == torch.float16
    assert len(cache) == 1 and cache.live is plan16


def test_a_changed_upsampling_replaces_the_plan():
    """Upsampling stages without tensors are compared on refresh: the tensors alone match."""
    model = _model(upsample="bilinear")
    cache = PlanCache()
    build, _ = _build(model)
    bilinear = cache.get(torch.float32, CPU, model._scan().stamp, build)
    for block in model.decoders:
        block.up = nn.Upsample(scale_factor=2, mode="nearest").eval()
    nearest = cache.get(torch.float32, CPU, model._scan().stamp, build)
    assert nearest is not bilinear
    assert [up.mode for up in nearest.ups] == ["nearest", "nearest"]


def test_upsampling_stages_compare_by_what_they_do():
    model = _model(upsample="transpose")
    first = ops.build_plan(model.fused_layout(), torch.float32, CPU)
    with torch.no_grad():
        model.decoders[0].up.weight.add_(1.0)
    second = ops.build_plan(model.fused_layout(), torch.float32, CPU)
    assert first.ups == second.ups  # the packed tensors differ, the stages do not
    assert ops.UpStage("bilinear", True) != ops.UpStage("bilinear", False) != ops.UpStage("nearest")
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.ups[0].mode = "nearest"


def test_a_stamp_whose_objects_died_does_not_match():
    """An id in the stamp may be reused by a new object once the old one is gone: the cache holds weak references
    to what the stamp names and rebuilds when one of them died, even if the ids and versions all match."""
    model = _model()
    cache = PlanCache()
    build, builds = _build(model)
    mortal = nn.Identity()
    stamp = Stamp(("anything",), [mortal])
    cache.get(torch.float32, CPU, stamp, build)
    cache.get(torch.float32, CPU, stamp, build)
    assert len(builds) == 1
    del mortal, stamp
    gc.collect()
    cache.get(torch.float32, CPU, Stamp(("anything",), [nn.Identity()]), build)
    assert len(builds) == 2


def test_release_if_stale():
    model = _model()
    cache = PlanCache()
    build, _ = _build(model)
    cache.get(torch.float32, CPU, model._scan().stamp, build)
    cache.release_if_stale(model._scan().stamp)
    assert len(cache) == 1
    with torch.no_grad():
        model.head.bias.add_(1.0)
    cache.release_if_stale(model._scan().stamp)
    assert len(cache) == 0


def test_copies_and_pickles_of_a_cache_are_empty():
    model = _model()
    cache = PlanCache()
    build, _ = _build(model)
    cache.get(torch.float32, CPU, model._scan().stamp, build)
    for copied in (copy.deepcopy(cache), copy.copy(cache), pickle.loads(pickle.dumps(cache))):
        assert len(copied) == 0 and copied.live is None
        copied.get(torch.float32, CPU, model._scan().stamp, build)  # and usable: a lock of its own
        assert len(copied) == 1


# -- the layout's math ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upsample", ["transpose", "bilinear", "nearest"])
def test_layout_math_is_the_reference_forward(upsample):
    torch.manual_seed(0)
    reference = UNet(**SMALL, upsample=upsample, norm="batch").double()
    randomize_norm_stats(reference)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 0.3  # comparable to the running variance: a dropped eps shows
    reference.eval()
    fast = FastUNet.from_reference(reference)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ops.layout_forward(fast.fused_layout(), x), reference(x), rtol=1e-12, atol=1e-12)


def test_layout_math_on_a_snapshot_reads_the_snapshot():
    torch.manual_seed(0)
    model = _model(norm="batch").double()
    layout = model.fused_layout()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    values = ops.layout_values(layout)
    snapshot = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in values.items()}
    with torch.no_grad():
        before = ops.layout_forward(layout, x)
        for p in model.parameters():
            p.mul_(-1.0)
        model.encoders[0].norm1.eps = 10.0
        assert torch.equal(ops.layout_forward(layout, x, snapshot), before)
        assert not torch.equal(ops.layout_forward(layout, x), before)


def test_no_layout_module_is_left_out_of_the_snapshot():
    model = _model(norm="batch", upsample="transpose")
    values = ops.layout_values(model.fused_layout())
    tensors = {id(v) for v in values.values() if isinstance(v, torch.Tensor)}
    named = dict(model.named_parameters()) | {
        name: b for name, b in model.named_buffers() if not name.endswith("num_batches_tracked")
    }
    missing = [name for name, t in named.items() if id(t) not in tensors]
    assert not missing, missing
    assert sum(1 for (_, attr) in values if attr == "eps") == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    )
