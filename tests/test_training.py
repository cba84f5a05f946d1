"""Training on the kernels (fastunet/training.py): whole-network gradients against float64 autograd of the
reference, which forwards take that path and which stay on the reference (and say why), no aten compute op in a
training step, determinism, second derivatives, autocast, torch.compile, an optimizer run, the ops' autograd
registration."""

from __future__ import annotations

import copy

import pytest
import torch
from test_convert import milesial
from test_convert_norms import NORMS, basic_like
from test_convert_structure import handmade
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet
from fastunet import FastUNet, UNet
from fastunet.kernels import _common
from fastunet.parity import randomize_norm_stats
from fastunet.tooling.trace import saved_for_backward
from fastunet.training import kernel_training_blocker

SMALL = {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}
KERNELS = ("triton", "triton-interpreter")


def _pair(device, upsample="bilinear", norm=None, **config) -> tuple[FastUNet, UNet]:
    if upsample == "bilinear-align":
        upsample, config = "bilinear", {**config, "align_corners": True}
    """A fused model in float32 on ``device`` and its float64 CPU twin (same parameters, independent tensors)."""
    reference = UNet(**{**SMALL, **config}, upsample=upsample, norm=norm)
    if norm is not None:
        randomize_norm_stats(reference)
    fast = FastUNet(**{**SMALL, **config}, upsample=upsample, norm=norm)
    fast.load_state_dict(reference.state_dict())
    return fast.to(device), copy.deepcopy(reference).double()


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double().cpu()
    return float((got.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-300))


def _grads(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    model(x).backward(grad)
    return {"input": x.grad, **{name: p.grad for name, p in model.named_parameters()}}


# fp32 kernels against float64: the forward's error budget (1e-5 normwise) holds for every gradient too.
BUDGET = 1e-5


@pytest.mark.parametrize(
    ("upsample", "size"),
    [
        ("bilinear", (16, 16)),
        ("bilinear", (17, 13)),
        ("bilinear-align", (13, 10)),
        ("transpose", (16, 12)),
        ("transpose", (9, 11)),
        ("nearest", (15, 16)),
    ],  # fmt: skip
)
def test_training_step_gradients_match_float64(device, upsample, size):
    fast, reference = _pair(device, upsample)
    fast.train()
    x = torch.randn(2, 3, *size)
    grad = torch.randn(2, 2, *size)
    found = _grads(fast, x.to(device), grad.to(device))
    assert fast.last_backend in KERNELS, fast.last_backend_reason
    assert fast.last_backend_reason == "training mode; backward kernels"
    expected = _grads(reference, x.double(), grad.double())
    assert found.keys() == expected.keys()
    for name, value in found.items():
        assert value.dtype == torch.float32 and value.shape == expected[name].shape, name
        assert _relative(value, expected[name]) <= BUDGET, (name, _relative(value, expected[name]))


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_training_step_gradients_on_tma_loads_match_float64(device, upsample):
    """The same step with TMA asked for: the forward convs and the weight gradients whose maps a row box can take
    (the 16-px level: 16-byte fp32 pixels, rows of one 16-px block) load by TMA, the 8-px level by pointers."""
    fast, reference = _pair(device, upsample)
    fast.train()
    x = torch.randn(2, 3, 16, 16)
    grad = torch.randn(2, 2, 16, 16)
    with _common.load_path("tma"), _common.launch_log() as records:
        found = _grads(fast, x.to(device), grad.to(device))
    assert fast.last_backend_reason == "training mode; backward kernels"
    paths = {(r.name, r.path) for r in records}
    assert ("conv_weight_grad", "tma") in paths and ("conv_weight_grad", "pointer") in paths, sorted(paths)
    expected = _grads(reference, x.double(), grad.double())
    for name, value in found.items():
        assert _relative(value, expected[name]) <= BUDGET, (name, _relative(value, expected[name]))


def test_eval_mode_gradients_with_folded_batchnorm_run_on_the_kernels(device):
    """Eval mode: BatchNorm folds into the conv; the fold is differentiable, so its weight and bias get gradients."""
    fast, reference = _pair(device, "transpose", norm="batch")
    fast.eval(), reference.eval()
    x, grad = torch.randn(2, 3, 12, 10), torch.randn(2, 2, 12, 10)
    found = _grads(fast, x.to(device), grad.to(device))
    assert fast.last_backend in KERNELS and fast.last_backend_reason.endswith("backward kernels")
    expected = _grads(reference, x.double(), grad.double())
    for name, value in found.items():
        assert _relative(value, expected[name]) <= BUDGET, (name, _relative(value, expected[name]))


@pytest.mark.parametrize(("upsample", "size"), [("bilinear", (13, 10)), ("transpose", (16, 12))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_training_on_the_kernels(device, upsample, size, momentum):
    """Batch statistics: the conv stores the pre-norm map and the statistics of the whole batch, a normalize launch
    applies them ahead of each conv reader (the upsample kernel and a 1x1 head on load); the backward reaches the
    map through the statistics. Gradients and the running statistics
    (unbiased variance, momentum or the cumulative average, the batch counter) match float64 torch."""
    fast, reference = _pair(device, upsample, norm="batch")
    for model in (fast, reference):
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = momentum
    fast.train(), reference.train()
    x, grad = torch.randn(2, 3, *size), torch.randn(2, 2, *size)
    for _ in range(2):  # two steps: the running statistics blend
        found = _grads(fast, x.to(device), grad.to(device))
        expected = _grads(reference, x.double(), grad.double())
    assert fast.last_backend in KERNELS and fast.last_backend_reason == "training mode; backward kernels"
    for name, value in found.items():
        assert _relative(value, expected[name]) <= BUDGET, (name, _relative(value, expected[name]))
    theirs = dict(reference.named_buffers())
    for name, buffer in fast.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(buffer) == int(theirs[name]) == 2, name
        else:
            assert _relative(buffer, theirs[name]) <= BUDGET, name


def test_a_frozen_batchnorm_in_a_training_model_folds(device):
    """A BatchNorm in eval mode inside a training model uses its running statistics (folded) and keeps them."""
    fast, reference = _pair(device, "bilinear", norm="batch")
    fast.train(), reference.train()
    for model in (fast, reference):
        model.encoders[1].norm2.eval()
    x, grad = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)
    found = _grads(fast, x.to(device), grad.to(device))
    expected = _grads(reference, x.double(), grad.double())
    assert fast.last_backend in KERNELS
    for name, value in found.items():
        assert _relative(value, expected[name]) <= BUDGET, (name, _relative(value, expected[name]))
    assert int(fast.encoders[1].norm2.num_batches_tracked) == 0
    assert int(fast.encoders[1].norm1.num_batches_tracked) == 1


def test_blockers_name_the_module_and_the_feature():
    model = FastUNet(**SMALL, upsample="bilinear", norm="batch").train()
    assert kernel_training_blocker(model.fused_layout(), training=True) is None
    assert kernel_training_blocker(model.fused_layout(), training=False) is None
    model.encoders[1].conv2.padding = (0, 0)
    reason = kernel_training_blocker(model.fused_layout(), training=False)
    assert reason.startswith("enc1.conv2: only 3x3 'same' convs and 3x3 stride-2 padding-1"), reason
    silu = fastunet.convert(handmade(act=nn.SiLU(), norm=False).eval())
    reason = kernel_training_blocker(silu.fused_layout(), training=False)
    assert reason.startswith("enc0.conv1: the silu activation in a conv's epilogue has no backward kernels"), reason


@pytest.mark.parametrize(("bilinear", "steps"), [(True, 2), (False, 1)], ids=["bilinear", "transpose"])
def test_a_converted_model_trains_on_the_kernels(device, bilinear, steps):
    """milesial's layout (BatchNorm after every conv) in training mode: convert found its training-mode forward to be
    the layout's, so the steps run on the backward kernels; gradients and running statistics (shared with the
    source model) match float64 training-mode autograd of the source, step after step."""
    source = milesial(bilinear=bilinear, depth=2).to(device)
    exact = copy.deepcopy(source).cpu().double().train()
    converted = fastunet.convert(source).train()
    assert converted._training_blocker is None
    for step in range(steps):
        x, grad = torch.randn(2, 3, 16, 12), torch.randn(2, 2, 16, 12)
        found = _grads(converted, x.to(device), grad.to(device))
        assert converted.last_backend in KERNELS, converted.last_backend_reason
        assert converted.last_backend_reason == "training mode; backward kernels"
        expected = _grads(exact, x.double(), grad.double())
        for (name, value), (exact_name, want) in zip(found.items(), expected.items(), strict=True):
            assert name == exact_name and _relative(value, want) <= BUDGET, (step, name, _relative(value, want))
        for (name, value), want in zip(source.named_buffers(), exact.buffers(), strict=True):
            if value.dtype.is_floating_point:
                assert _relative(value, want) <= BUDGET, (step, name)
            else:
                assert torch.equal(value.cpu(), want), (step, name)


class _DropoutUNet(nn.Module):
    """A hand-written U-Net with a dropout in its bottleneck: identity in eval mode, random in training mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Dropout(p), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        skip = self.down(x)
        low = self.bottom(nn.functional.max_pool2d(skip, 2))
        return self.head(self.dec(torch.cat([skip, self.up(low)], 1)))


def test_a_training_only_branch_keeps_the_source_forward_in_training_mode(device):
    """A dropout with p > 0 is not in the layout: training mode runs the source class's own forward, and says why;
    eval mode (where the dropout is the identity) runs the kernels. With p = 0 training runs on the kernels."""
    converted = fastunet.convert(_DropoutUNet(0.5).to(device)).train()
    converted(torch.randn(2, 3, 8, 8, device=device)).sum().backward()
    assert converted.last_backend == "reference"
    assert "training-only branch" in converted.last_backend_reason, converted.last_backend_reason
    converted.eval()
    converted(torch.randn(1, 3, 8, 8, device=device)).sum().backward()
    assert converted.last_backend in KERNELS and converted.last_backend_reason.endswith("backward kernels")
    plain = fastunet.convert(_DropoutUNet(0.0).to(device)).train()
    plain(torch.randn(2, 3, 8, 8, device=device)).sum().backward()
    assert plain.last_backend in KERNELS, plain.last_backend_reason


def test_an_unverified_conversion_trains_on_its_source_forward(device):
    converted = fastunet.convert(milesial(bilinear=True).to(device), verify=False).train()
    converted(torch.randn(2, 3, 16, 16, device=device)).sum().backward()
    assert converted.last_backend == "reference"
    assert "not checked against the layout" in converted.last_backend_reason, converted.last_backend_reason


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
def test_eval_gradients_of_a_converted_model_with_the_upsampled_map_first(device, up):
    """cat([up, skip]): the plan moves the skip's weight rows first; the gradient reaches the source's own order."""
    source = handmade(up=up, up_first=True)
    converted = fastunet.convert(copy.deepcopy(source).to(device)).eval()
    exact = copy.deepcopy(source).double().eval()
    x, grad = torch.randn(2, 3, 13, 12), torch.randn(2, 2, 13, 12)
    found = _grads(converted, x.to(device), grad.to(device))
    assert converted.last_backend in KERNELS and converted.last_backend_reason.endswith("backward kernels")
    expected = _grads(exact, x.double(), grad.double())
    assert found.keys() == expected.keys()
    for name, value in found.items():
        assert _relative(value, expected[name]) <= BUDGET, (name, _relative(value, expected[name]))


# Aten ops that would mean a layer's math ran in PyTorch rather than on the kernels.
FORBIDDEN = (
    "convolution", "max_pool", "upsample", "cat", "relu", "threshold_backward", "where", "_softmax", "addmm", "mm",
    "bmm", "index_put", "scatter", "col2im", "im2col",
)  # fmt: skip


class _AtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func._schema.name.split("::")
        if namespace == "aten":
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("upsample", "norm"), [("bilinear", None), ("transpose", None), ("bilinear", "batch")])
def test_a_training_step_runs_no_aten_layer_op(device, upsample, norm):
    fast, _ = _pair(device, upsample, norm=norm)
    fast.train()
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    with _AtenOps() as ops:
        fast(x).square().mean().backward()
    assert fast.last_backend in KERNELS
    forbidden = sorted({name for name in ops.names if name in FORBIDDEN or name.startswith(FORBIDDEN[:3])})
    assert not forbidden, forbidden


def test_two_backward_runs_are_bitwise_identical(device):
    fast, _ = _pair(device, "bilinear")
    fast.train()
    x, grad = torch.randn(2, 3, 11, 9, device=device), torch.randn(2, 2, 11, 9, device=device)
    first = _grads(fast, x, grad)
    second = _grads(fast, x, grad)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_reference_config_backward_has_no_activation_launch_for_plain_relu_convs(upsample):
    """The reference configuration (base 64, depth 4, batch 16 at 512x512, traced on ``meta``): every plain ReLU
    conv's backward takes the arriving gradient as dZ, its readers having applied the ReLU's derivative in their own
    launches (the next conv's input gradient, the decoder's upsample adjoint or transposed conv's input gradient, the
    fused head's one-pass backward): no ``activation_pool_backward`` launch is left; each encoder's second conv keeps
    its pooled one (routing the pooled gradient, adding the skip's)."""
    from fastunet.tooling.trace import trace_training

    config = {"in_channels": 3, "num_classes": 2, "base_channels": 64, "depth": 4, "upsample": upsample}
    records = trace_training(config, (16, 3, 512, 512), torch.bfloat16, sm_count=132, arch=90)
    backward = [(r.stage, r.name) for r in records if r.stage and r.stage.endswith(".backward")]
    names = [name for _, name in backward]
    assert "activation_pool_backward" not in names
    pooled = sorted(stage for stage, name in backward if name == "activation_pool_backward+pool")
    assert pooled == [f"enc{level}.conv2.backward" for level in range(4)]
    up_mask = "upsample2x_adjoint+gate" if upsample == "bilinear" else "conv2x2/2+mask"
    masked = {stage for stage, name in backward if name.endswith("+mask") or name == up_mask}
    # Each reader of a plain ReLU conv's map: the conv after it, the decoder conv upsampling it, the head (fused into
    # the last conv: its one-pass backward, in dec0.conv2's, applies that conv's own ReLU derivative).
    readers = {f"enc{level}.conv2.backward" for level in range(4)} | {"bottleneck.conv2.backward"}
    readers |= {f"dec{level}.conv{i}.backward" for level in range(4) for i in (1, 2)}
    assert masked == readers
    assert ("dec0.conv2.backward", "head_backward+mask") in backward
    assert sum(name == up_mask for name in names) == 4


def test_strided_down_sampling_keeps_the_skips_own_relu_derivative(device):
    """A layout that down-samples by strided convs (DynUNet's structure, its norms folded, ReLU): the skip map of an
    encoder's second conv has two readers (the strided conv below, the decoder conv), so that conv keeps its own
    derivative launch; its strided reader's input gradient applies nothing; every other ReLU conv's readers do.
    Gradients against float64 autograd of the source at an odd size."""
    from test_convert_norms import assert_trains_on_the_kernels, dyn_like

    model = dyn_like(norm=NORMS["instance-running"], fit=True).eval()
    for module in model.modules():
        if hasattr(module, "lrelu"):
            module.lrelu = nn.ReLU()
    x = torch.randn(2, 2, 13, 10, generator=torch.Generator().manual_seed(4))
    with _common.launch_log() as records:
        assert_trains_on_the_kernels(model, x, device, training=False)
    backward = [(r.stage, r.name) for r in records if r.stage and r.stage.endswith(".backward")]
    plain = {stage for stage, name in backward if name == "activation_pool_backward"}
    assert plain == {"enc0.conv2.backward", "enc1.conv2.backward"}, backward
    assert ("enc1.conv1.backward", "conv3x3/2.input_grad") in backward  # the strided conv reads the skip: unmasked
    assert ("enc1.conv2.backward", "conv3x3+mask") in backward


@pytest.mark.parametrize(
    ("upsample", "norm"),
    [
        ("bilinear", None),
        ("transpose", None),
        ("transpose", "batch"),
        ("bilinear", "batch"),
    ],
)
def test_double_backward_in_training_mode_matches_float64(device, upsample, norm):
    """A gradient penalty: under create_graph each op's backward differentiates its own PyTorch math (the decoder
    conv's launch making the upsampled map itself: an interpolation, or the transposed conv). With BatchNorm's
    batch statistics the maps after a norm and their scale and shift come out of one launch that also feeds the
    pool and the deeper levels, and the decoder conv reads both the skip and the low-resolution map made from it:
    each op's create-graph backward must give only its own partial derivatives (the penalty's input gradient is
    checked too, the first derivative taken with the graph kept). Within the budget, or (second derivatives through
    batch statistics are ill-conditioned: eager float32 itself is off by about 1e-5 there) twice eager float32
    PyTorch's own error plus the budget."""
    fast, reference = _pair(device, upsample, norm=norm)
    fast.train(), reference.train()
    eager = copy.deepcopy(reference).float()  # the same float32 values, run by PyTorch
    x = torch.randn(2, 3, 8, 8)
    found = {}
    for key, model, x_in in (("ours", fast, x.to(device)), ("exact", reference, x.double()), ("eager", eager, x)):
        x_in = x_in.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        out = model(x_in)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x_in, create_graph=True)
        (out.sum() + grad_x.square().sum()).backward()
        found[key] = {"grad_x": grad_x.detach(), **{name: p.grad for name, p in model.named_parameters()}}
    assert fast.last_backend in KERNELS
    assert fast.last_backend_reason == "training mode; backward kernels"
    for name, value in found["ours"].items():
        exact = found["exact"][name]
        allowed = BUDGET + 2 * _relative(found["eager"][name], exact)
        assert _relative(value, exact) <= allowed, (name, _relative(value, exact), allowed)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_double_backward_through_per_image_norms_matches_float64(device, norm):
    """InstanceNorm / GroupNorm after every conv (MONAI BasicUNet's structure, LeakyReLU, the replicate join),
    converted and in training mode: a gradient penalty's parameter gradients against float64 autograd of the source,
    within twice eager float32 PyTorch's own error plus the budget. A conv bias right before an InstanceNorm has a
    zero gradient in exact math: its error is held to the layer's weight gradient's scale."""
    source = basic_like(norm=NORMS[norm]).train()
    converted = fastunet.convert(copy.deepcopy(source).to(device)).train()
    exact, eager = copy.deepcopy(source).double(), copy.deepcopy(source)
    x = torch.randn(2, 3, 12, 10)
    found = {}
    for key, model, x_in in (("ours", converted, x.to(device)), ("exact", exact, x.double()), ("eager", eager, x)):
        x_in = x_in.clone().requires_grad_()
        out = model(x_in)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x_in, create_graph=True)
        (out.sum() + grad_x.square().sum()).backward()
        found[key] = {"grad_x": grad_x.detach(), **{name: p.grad for name, p in model.named_parameters()}}
    assert converted.last_backend in KERNELS and converted.last_backend_reason == "training mode; backward kernels"
    expected = found["exact"]
    for name, value in found["ours"].items():
        err = float((value.double().cpu() - expected[name]).norm())
        eager_err = float((found["eager"][name].double() - expected[name]).norm())
        scale = float(expected[name].norm())
        if name.endswith(".bias") and name[: -len("bias")] + "weight" in expected:
            scale = max(scale, float(expected[name[: -len("bias")] + "weight"].norm()))
        assert err <= 2 * eager_err + BUDGET * scale, (name, err, eager_err, scale)


def test_autocast_gradients_come_back_in_the_parameters_dtype(device):
    """Under bf16 autocast every map and gradient is stored in bf16: the error against float64 is held to twice
    what eager PyTorch's own autocast backward gets, plus a floor."""
    fast, reference = _pair(device, "bilinear")
    eager = copy.deepcopy(reference).float().to(device)
    fast.train()
    x, grad = torch.randn(2, 3, 16, 16), torch.randn(2, 2, 16, 16)
    found = {}
    for model in (fast, eager):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x.to(device))
        assert out.dtype == torch.bfloat16
        out.backward(grad.to(device, torch.bfloat16))
        found[model is fast] = {name: p.grad for name, p in model.named_parameters()}
    assert fast.last_backend in KERNELS
    expected = _grads(reference, x.double(), grad.to(torch.bfloat16).double())
    for name, value in found[True].items():
        assert value.dtype == torch.float32, name
        ours, theirs = _relative(value, expected[name]), _relative(found[False][name], expected[name])
        assert ours <= 2 * theirs + 1e-2, (name, ours, theirs)


def test_adamw_steps_track_the_reference(device):
    """Ten AdamW steps from the same start: the loss curves and final parameters of the fused model (fp32
    kernels) and of the float64 reference stay together."""
    fast, reference = _pair(device, "bilinear")
    fast.train(), reference.train()
    x, target = torch.randn(2, 3, 12, 12), torch.randn(2, 2, 12, 12)
    losses = {}
    for model, cast in ((fast, lambda t: t.to(device)), (reference, torch.Tensor.double)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        curve = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = (model(cast(x)) - cast(target)).square().mean()
            loss.backward()
            optimizer.step()
            curve.append(float(loss))
        losses[model is fast] = torch.tensor(curve, dtype=torch.float64)
    assert fast.last_backend in KERNELS
    assert losses[True][-1] < losses[True][0]
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=0)
    for (name, p), (_, q) in zip(fast.named_parameters(), reference.named_parameters(), strict=True):
        assert _relative(p.detach(), q.detach()) <= 1e-4, name


@pytest.mark.parametrize("norm", [None, "batch"])
def test_compiled_training_step_runs_the_kernels(device, norm):
    """torch.compile with fullgraph (a graph break raises) gives the eager step's gradients bit for bit; with
    BatchNorm's batch statistics the maps applied ahead of their conv readers (under no_grad) trace too."""
    fast, _ = _pair(device, "transpose", norm=norm)
    fast.train()
    x, grad = torch.randn(2, 3, 8, 8, device=device), torch.randn(2, 2, 8, 8, device=device)
    eager = _grads(fast, x, grad)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    found = _grads(compiled, x, grad)
    assert fast.last_backend in KERNELS, fast.last_backend_reason
    for name in eager:
        found_name = name if name in found else f"_orig_mod.{name}"
        assert torch.equal(found[found_name], eager[name]), name


@pytest.mark.parametrize(("upsample", "norm"), [("bilinear", None), ("transpose", "batch")])
def test_saved_bytes_on_meta_match_a_real_run(device, upsample, norm):
    """What autograd keeps from a training forward, counted per storage: the meta-device count equals a real
    run's count."""
    config = {**SMALL, "upsample": upsample, "norm": norm}
    fast = FastUNet(**config).to(device).train()
    sizes: dict[int, tuple[int, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = (storage.nbytes(), t.dim())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fast(torch.randn(2, 3, 16, 16, device=device))
    assert fast.last_backend in KERNELS
    measured = saved_for_backward(config, (2, 3, 16, 16), torch.float32)
    assert measured["maps"] == sum(size for size, dim in sizes.values() if dim == 4)
    assert measured["tensors"] == len(sizes)


REFERENCE = {"in_channels": 3, "num_classes": 2, "base_channels": 64, "depth": 4}


@pytest.mark.parametrize(
    ("upsample", "norm"),
    [("nearest", None), ("transpose", None), ("bilinear", "batch"), ("nearest", "batch"), ("transpose", "batch")],
)
def test_saved_maps_stay_under_the_target_in_every_covered_config(upsample, norm):
    """The reference config (base 64, depth 4, 512x512, bf16) keeps under 300 MB of maps per image in training
    mode whatever the upsampling and with BatchNorm's batch statistics: the upsampled map (interpolated or the
    transposed conv's output, read through the norm or not) is made inside the decoder conv's launch and made again
    in the backward, so no config keeps more than plain bilinear upsampling does (the same maps: each conv's input
    and output, the pooled maps)."""
    shape, dtype = (1, 3, 512, 512), torch.bfloat16
    bilinear = saved_for_backward({**REFERENCE, "upsample": "bilinear"}, shape, dtype)["maps"]
    maps = saved_for_backward({**REFERENCE, "upsample": upsample, "norm": norm}, shape, dtype)["maps"]
    assert bilinear < 300e6
    assert maps < 300e6, maps
    assert maps <= bilinear, (maps, bilinear)


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_the_training_forward_applies_each_norm_ahead_of_its_conv_readers(upsample):
    """BatchNorm with batch statistics, traced on the meta device: no conv or transposed conv of the training step
    but the 1x1 head normalizes its operand on load (the launch that does takes it through registers); one normalize
    launch
    applies the norm ahead of each such reader (stage ``<reader>.normalize``), the encoder's skip again ahead of its
    decoder conv, the low-resolution map ahead of the decoder conv's transposed conv. The backward's transposed-conv
    recompute reads the applied map too. What autograd keeps is test_saved_maps_stay_under_the_target_in_every_
    covered_config's."""
    from fastunet.tooling.trace import trace_training

    records = trace_training({**SMALL, "upsample": upsample, "norm": "batch"}, (2, 3, 16, 16), torch.float16)
    forward = [r for r in records if not (r.stage or "").endswith(".backward")]
    on_load = [(r.stage, r.name) for r in records if r.constexprs.get("NORM_IN") and r.name.startswith("conv")]
    assert on_load == [("head", "conv1x1+norm_in")]  # a 1x1 head's few columns: cheaper on load
    applied = [r.stage for r in forward if r.name == "normalize"]
    readers = ["enc0.conv2", "enc1.conv2", "bottleneck.conv2"]  # the deeper levels' first convs read pooled maps
    for level in (1, 0):
        readers += [f"dec{level}.up"] if upsample == "transpose" else []
        readers += [f"dec{level}.conv1", f"dec{level}.conv2"]
    assert sorted(applied) == sorted(f"{reader}.normalize" for reader in readers)


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_the_backward_writes_each_stride_one_readers_applied_map_in_its_input_gradient(upsample):
    """BatchNorm with batch statistics, traced on the meta device: each stride-1 3x3 conv that read a map through its
    norm takes the map's gradient through the read in its input gradient's epilogue, which also writes the values
    the forward read for the weight gradient (``+norm_read+applied``), and the 1x1 head takes its whole backward in
    one pass over z (``head_backward+norm_read``: no input gradient, weight gradient or applied map of its own): the
    backward launches no normalize for them. What is left applies the low-resolution map a transposed conv reads
    (its recompute in the decoder conv's backward and the transposed conv's own weight gradient: two per level)."""
    from fastunet.tooling.trace import trace_training

    records = trace_training({**SMALL, "upsample": upsample, "norm": "batch"}, (2, 3, 16, 16), torch.float16)
    backward = [r for r in records if (r.stage or "").endswith(".backward")]
    reads = sorted(r.stage for r in backward if r.name.endswith("+norm_read+applied"))
    readers = ["enc0.conv2", "enc1.conv2", "bottleneck.conv2"]  # the deeper first convs read pooled maps
    readers += [f"dec{level}.conv{i}" for level in (0, 1) for i in (1, 2)]
    assert reads == sorted(f"{reader}.backward" for reader in readers), reads
    head = [r.name for r in backward if r.stage == "head.backward"]
    assert head == ["head_backward+norm_read", "head_backward.sum"] + ["head_backward+norm_read.sum"] * 2, head
    applied = sorted(r.stage for r in backward if r.name.startswith("normalize"))
    expected = [f"dec{level}.conv1.backward" for level in (0, 0, 1, 1)] if upsample == "transpose" else []
    assert applied == expected, applied


def test_the_training_forward_fuses_the_head_into_the_last_conv():
    """The reference config's training step (traced on the meta device, nothing run): the 1x1 head runs in
    dec0.conv2's epilogue, which stores the logits and the activated map the head's weight gradient reads; the head
    has no launch of its own, forward or backward, and the forward launches as many kernels as the eval forward
    (besides the weights' pack)."""
    from fastunet.kernels.conv import HEAD_MAP
    from fastunet.tooling.trace import trace_config, trace_training

    shape, dtype = (2, 3, 64, 64), torch.bfloat16
    records = trace_training({**REFERENCE, "upsample": "bilinear"}, shape, dtype)
    stages = [r.stage or "" for r in records]
    assert not [s for s in stages if s == "head" or s.startswith("head.")], sorted(set(stages))
    last = [r for r in records if r.stage == "dec0.conv2"]
    assert len(last) == 1 and last[0].name == "conv3x3+head" and last[0].constexprs["HEAD"] == HEAD_MAP.value
    logits, features = 2 * 2 * 64 * 64 * 2, 2 * 64 * 64 * 64 * 2  # bytes: 2 classes and 64 channels, bf16
    assert last[0].bytes_written == logits + features
    forward = [s for s in stages if not s.endswith(".backward") and s != "pack"]  # pack: the weights, one launch
    assert len(forward) == len(trace_config({**REFERENCE, "upsample": "bilinear"}, shape, dtype))


def test_training_forward_logits_and_the_saved_map_match_float64(device):
    """Training mode: the logits against the float64 reference, and the map autograd keeps for the head (the head's
    input in the reference) among the saved tensors, against the reference's."""
    fast, reference = _pair(device, "bilinear")
    fast.train()
    x = torch.randn(2, 3, 13, 10)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = fast(x.to(device).requires_grad_())
    assert fast.last_backend in KERNELS, fast.last_backend_reason
    head_input: list[torch.Tensor] = []
    reference.head.register_forward_hook(lambda module, inputs, output: head_input.append(inputs[0]))
    expected = reference(x.double())
    assert _relative(logits, expected) <= BUDGET
    features = head_input[0].permute(0, 2, 3, 1)  # NHWC, as the kernels keep it
    candidates = [t for t in saved if t.shape == features.shape and t.dtype == torch.float32]
    assert min(_relative(t, features) for t in candidates) <= BUDGET


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, x: torch.Tensor, target: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = FastUNet(**SMALL, upsample="bilinear").train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        part = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        loss = (ddp(x[part]) - target[part]).square().mean()
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save({"grads": grads, "backend": model.last_backend}, f"{out_dir}/rank{rank}.pt")
        # Tear down in order: the DDP reducer holds the process group, and releasing it after the group is
        # destroyed can leave gloo's threads waiting on a peer that has exited.
        del ddp, loss
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    """Two gloo processes on the CPU, each half the batch: DDP's averaged gradients are the gradients of one
    process on the whole batch (the loss a mean over the batch)."""
    import torch.multiprocessing as mp

    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 2, 8, 8)
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), x, target), nprocs=2, start_method="fork"
    )
    torch.manual_seed(0)
    model = FastUNet(**SMALL, upsample="bilinear").train()
    (model(x) - target).square().mean().backward()
    assert model.last_backend in KERNELS
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        assert found["backend"] in KERNELS
        for name, p in model.named_parameters():
            assert _relative(found["grads"][name], p.grad) <= 1e-5, (rank, name)


@pytest.mark.parametrize(
    ("norm", "act", "training"),
    [
        ("instance", "leakyrelu", False),
        (("group", {"num_groups": 2}), "relu", False),
        ("batch", "relu", False),
        ("batch", "relu", True),  # batch statistics: convert found the training-mode forward to be the layout's
    ],
)
def test_monai_basic_unet_gradients_on_the_kernels(device, norm, act, training):
    """MONAI's BasicUNet in eval mode (InstanceNorm or GroupNorm statistics from the data, a folded BatchNorm; the
    replicate join), and in training mode with BatchNorm's batch statistics: gradients on the kernels match float64
    autograd of the source model, within twice eager float32 PyTorch's own error plus the budget. The input is
    48x47, so that the bottleneck is 3x2: an InstanceNorm over a 2x1 bottleneck normalizes each channel over two
    values, which amplifies the rounding of any float32 order of summation (eager's, or a K block of 32 channels
    where another loader takes 16) by orders of magnitude, so the comparison there measured the summation order
    rather than the gradient. A conv bias right before an InstanceNorm has a zero gradient in exact math: its error
    is held to the layer's weight gradient's scale."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    features = (4, 4, 8, 8, 16, 4)
    source = nets.BasicUNet(
        spatial_dims=2, in_channels=3, out_channels=2, features=features, norm=norm, act=act, upsample="deconv"
    ).train(training)
    converted = fastunet.convert(copy.deepcopy(source).to(device)).train(training)
    exact = copy.deepcopy(source).double().train(training)
    x, grad = torch.randn(2, 3, 48, 47), torch.randn(2, 2, 48, 47)
    found = _grads(converted, x.to(device), grad.to(device))
    assert converted.last_backend in KERNELS and converted.last_backend_reason.endswith("backward kernels")
    expected = _grads(exact, x.double(), grad.double())
    eager = _grads(copy.deepcopy(source).train(training), x, grad)  # PyTorch's own float32, for the conditioning
    for name, value in found.items():
        err = float((value.double().cpu() - expected[name]).norm())
        eager_err = float((eager[name].double() - expected[name]).norm())
        scale = float(expected[name].norm())
        if name.endswith(".bias") and name[: -len("bias")] + "weight" in expected:  # the same layer's scale
            scale = max(scale, float(expected[name[: -len("bias")] + "weight"].norm()))
        assert err <= 2 * eager_err + BUDGET * scale, (name, err, eager_err, scale)


def test_training_mode_with_frozen_parameters_still_uses_batch_statistics(device):
    """Nothing requires a gradient (every parameter frozen, the input plain), gradients enabled: a training-mode
    BatchNorm still normalizes with the batch's statistics and updates its running ones, as in torch."""
    fast, reference = _pair(device, "bilinear", norm="batch")
    fast.train(), reference.train()
    for model in (fast, reference):
        model.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    out, expected = fast(x.to(device)), reference(x.double())
    assert fast.last_backend in KERNELS
    assert _relative(out.detach(), expected) <= BUDGET
    assert _relative(fast.encoders[0].norm1.running_var, reference.encoders[0].norm1.running_var) <= BUDGET


@pytest.mark.parametrize("create_graph", [False, True], ids=["first-order", "create-graph"])
def test_reference_backward_counts_an_input_made_from_a_parameter_once(device, create_graph):
    """A layout without backward kernels (a SiLU epilogue) recomputes its math in the backward. When the input is
    itself computed from one of the model's parameters, that parameter's gradient through the input is counted once,
    as autograd of the source model counts it (differentiating the recompute with respect to the input and the
    parameters together would run the input's own history again and add it twice)."""
    source = handmade(act=nn.SiLU(), norm=False).eval()
    exact = copy.deepcopy(source).double()
    converted = fastunet.convert(source).to(device)
    img = torch.randn(2, 3, 8, 8)
    name = next(iter(dict(source.named_parameters())))

    def grads(model, dtype, where):
        params = dict(model.named_parameters())
        x = img.to(where, dtype) * params[name].sum()  # the input depends on the model's first weight
        out = model(x)
        found = torch.autograd.grad((out * out).sum(), list(params.values()), create_graph=create_graph)
        return dict(zip(params, found, strict=True))

    found = grads(converted, torch.float32, device)
    assert converted.last_backend in KERNELS and converted.last_backend_reason == "eval mode"  # no backward kernels
    assert "silu" in kernel_training_blocker(converted.fused_layout(), training=False)
    expected = grads(exact, torch.float64, "cpu")
    for key, value in found.items():
        assert _relative(value, expected[key]) <= BUDGET, (key, _relative(value, expected[key]))
