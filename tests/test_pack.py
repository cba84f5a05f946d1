"""Weight packing (kernels/pack.py, the ``fastunet::pack_weights`` op and its registered adjoint): the packed pieces
against torch's permute/cast, the source gradients against float64 autograd of the torch fold/permute, special
values, opcheck, one launch per training forward (none while the parameters are unchanged), the cache never
stale."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastunet import FastUNet, UNet
from fastunet.kernels import _common
from fastunet.kernels.pack import CONV, TRANSPOSE, VECTOR, ZEROS, pack_pieces, pack_weights, pack_weights_adjoint
from fastunet.training import _PackedWeights, build_training_plan

KERNELS = ("triton", "triton-interpreter")
SMALL = {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _sources(device, dtype=torch.float32) -> tuple[list[int], list[torch.Tensor]]:
    """A spec touching every kind: a conv weight and bias, a conv with rotated channels, a channels-last conv weight
    with a channel rotation, a strided (sliced) bias, a transposed conv with its bias repeated 4 times, a missing
    bias (zeros), a 1x1 head."""
    conv = torch.randn(5, 7, 3, 3, device=device, dtype=dtype)
    bias = torch.randn(5, device=device, dtype=dtype)
    rotated = torch.randn(6, 5, 3, 3, device=device, dtype=dtype)
    last = torch.randn(4, 6, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    strided = torch.randn(8, device=device, dtype=dtype)[::2]
    up = torch.randn(6, 3, 2, 2, device=device, dtype=dtype)
    up_bias = torch.randn(3, device=device, dtype=dtype)
    head = torch.randn(2, 4, 1, 1, device=device, dtype=dtype)
    spec = [CONV, 0, VECTOR, 1, CONV, 2, ZEROS, 6, CONV, 5, VECTOR, 1, TRANSPOSE, 0, VECTOR, 4, CONV, 0, ZEROS, 2]
    return spec, [conv, bias, rotated, last, strided, up, up_bias, head]


def _torch_pieces(spec: list[int], sources: list[torch.Tensor]) -> list[torch.Tensor]:
    """What each piece is, by the torch ops the training plan used before the pack launch (fastunet.training's
    ``_pack`` and the transposed conv's permute and ``repeat``): differentiable, in the sources' dtype."""
    out, it = [], iter(sources)
    for kind, argument in zip(spec[::2], spec[1::2], strict=True):
        if kind == ZEROS:
            out.append(None)
            continue
        t = next(it)
        if kind == CONV:
            if argument:
                t = torch.cat([t[:, argument:], t[:, :argument]], dim=1)
            c_out, c_in, kh, kw = t.shape
            out.append(t.permute(2, 3, 1, 0).reshape(kh * kw * c_in, c_out))
        elif kind == TRANSPOSE:
            out.append(t.permute(0, 2, 3, 1).reshape(t.shape[0], 4 * t.shape[1]))
        else:
            out.append(t.repeat(argument))
    return out


@pytest.mark.parametrize("source_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pieces_equal_torch_permute_and_cast(device, source_dtype, dtype):
    """Pure data movement and one cast: every piece equals torch's permute + ``.to(dtype)`` bit for bit (NaN-poisoned
    buffer: a piece the launch forgot stays NaN), and each piece starts on a 16-byte boundary."""
    spec, sources = _sources(device, source_dtype)
    with _common.launch_log() as records:
        flat = pack_weights(sources, spec, dtype)
    assert [r.name for r in records] == ["pack_weights"]
    pieces, total = pack_pieces(spec, [s.shape for s in sources], dtype)
    assert flat.shape == (total,) and flat.dtype == dtype
    for (start, shape), expected in zip(pieces, _torch_pieces(spec, sources), strict=True):
        assert start * flat.element_size() % 16 == 0
        got = flat[start : start + math.prod(shape)].view(shape)
        want = expected.to(dtype) if expected is not None else torch.zeros(shape, dtype=dtype, device=device)
        assert torch.equal(got, want), shape


@pytest.mark.parametrize("packed_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_source_gradients_match_float64_autograd_of_the_torch_packing(device, source_dtype, packed_dtype):
    """Through the pack's autograd (one adjoint launch): each source's gradient in its own dtype, against float64
    autograd of the torch permute/rotation/repeat applied to the same pieces' gradients: a copy is exact up to the
    final rounding, a repeated bias's fp32 sum of 4 terms within its rounding error bound."""
    spec, sources = _sources(device, source_dtype)
    leaves = [s.detach().clone().requires_grad_() for s in sources]
    pieces = _PackedWeights.apply(tuple(spec), packed_dtype, "", *leaves)
    grads = [torch.randn(p.shape, device=device).to(packed_dtype) for p in pieces]
    with _common.launch_log() as records:
        torch.autograd.backward(pieces, grads)
    assert [r.name for r in records] == ["pack_weights_backward"]
    exact, sizes = ([s.detach().double().requires_grad_() for s in sources] for _ in range(2))
    for leaves_64, weights in ((exact, grads), (sizes, [g.double().abs() for g in grads])):
        expected = _torch_pieces(spec, leaves_64)
        used = [(e, g.double()) for e, g in zip(expected, weights, strict=True) if e is not None]
        torch.autograd.backward([e for e, _ in used], [g for _, g in used])
    # fp32 sums of up to 4 terms (a repeated bias), rounded once to the source dtype: |error| <= 4 u32 sum|g| plus
    # half an ulp of the result (exact for a plain copy)
    unit = torch.finfo(source_dtype).eps / 2
    for leaf, ref, size in zip(leaves, exact, sizes, strict=True):
        assert leaf.grad.dtype == source_dtype and leaf.grad.shape == ref.shape
        err = (leaf.grad.double() - ref.grad).abs()
        assert bool((err <= unit * ref.grad.abs() + 4 * 2**-24 * size.grad).all()), float(err.max())


def test_special_values_pass_through_both_directions(device):
    """NaN and +-inf in a parameter land at the same packed places as torch puts them (a value beyond fp16's range
    becomes inf, as torch's cast makes it); in a piece's gradient they reach the same source elements as float64
    autograd's (inf + -inf over a repeated bias is NaN there too). Never clamped."""
    spec, sources = _sources(device)
    sources[0][1, 2, 0, 1] = float("nan")
    sources[0][3, 0, 2, 2] = float("inf")
    sources[2][4, 1, 1, 0] = -float("inf")  # a rotated channel
    sources[6][1] = 1e6  # fp16 overflow
    flat = pack_weights(sources, spec, torch.float16)
    pieces, _ = pack_pieces(spec, [s.shape for s in sources], torch.float16)
    packed = torch.cat([flat[start : start + math.prod(shape)] for start, shape in pieces])
    for (start, shape), expected in zip(pieces, _torch_pieces(spec, sources), strict=True):
        if expected is not None:
            got = flat[start : start + expected.numel()].view(shape)
            torch.testing.assert_close(got, expected.half(), rtol=0, atol=0, equal_nan=True)
    assert torch.isinf(packed).sum() == 2 + 4 and torch.isnan(packed).sum() == 1
    grads = [torch.randn(shape, device=device) for _, shape in pieces]
    grads[0][10, 3] = float("nan")
    grads[2][5, 1] = float("inf")
    grads[7][1], grads[7][4] = float("inf"), -float("inf")  # two sub-pixels of up_bias[1]: NaN
    grads[7][2] = float("inf")  # up_bias[2]: inf
    flat_grad = pack_weights_adjoint(grads, spec, [tuple(s.shape) for s in sources], torch.float32)
    exact = [s.detach().double().requires_grad_() for s in sources]
    expected = _torch_pieces(spec, exact)
    used = [(e, g.double()) for e, g in zip(expected, grads, strict=True) if e is not None]
    torch.autograd.backward([e for e, _ in used], [g for _, g in used])
    want = torch.cat([e.grad.reshape(-1) for e in exact]).float()
    torch.testing.assert_close(flat_grad, want, rtol=2**-22, atol=0, equal_nan=True)
    assert torch.isnan(flat_grad).sum() == 2 and torch.isinf(flat_grad).sum() == 2


def test_pack_ops_pass_opcheck(device):
    spec, sources = _sources(device)
    leaves = [s.clone().requires_grad_() for s in sources]
    torch.library.opcheck(torch.ops.fastunet.pack_weights.default, (leaves, spec, torch.bfloat16))
    pieces, _ = pack_pieces(spec, [s.shape for s in sources], torch.bfloat16)
    grads = [torch.randn(shape, device=device).bfloat16() for _, shape in pieces]
    grads[1] = None
    shapes = [v for s in sources for v in (s.dim(), *s.shape)]
    torch.library.opcheck(torch.ops.fastunet.pack_weights_backward.default, (grads, spec, shapes, torch.float32))


def test_bad_specs_say_what_was_expected(device):
    spec, sources = _sources(device)
    with pytest.raises(ValueError, match="a \\(c_in, c_out, 2, 2\\) weight"):
        pack_weights(sources[:1], [TRANSPOSE, 0], torch.float32)
    with pytest.raises(ValueError, match="takes 8 source tensors, got 7"):
        pack_weights(sources[:-1], spec, torch.float32)
    with pytest.raises(ValueError, match="unknown kind 7"):
        pack_weights(sources, [7, 0], torch.float32)
    with pytest.raises(TypeError, match="source 1 is torch.float16"):
        pack_weights([sources[0], sources[1].half()], [CONV, 0, VECTOR, 1], torch.float32)
    with pytest.raises(TypeError, match="expected float32, float16 or bfloat16 .*got torch.int32"):
        pack_weights(sources, spec, torch.int32)


# -- in the training forward -------------------------------------------------------------------------------------
def _launches(records, name: str) -> int:
    return sum(r.name == name for r in records)


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_one_pack_launch_per_training_forward_and_none_while_unchanged(device, upsample):
    """Every conv, transposed-conv and head weight and bias in one launch (stage ``pack``), its adjoint one launch
    (``pack.backward``); a second forward on unchanged parameters packs nothing; an optimizer step (versions
    bumped) makes the next forward pack again, once."""
    fast = FastUNet(**SMALL, upsample=upsample).to(device).train()
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)
    x = torch.randn(1, 3, 8, 8, device=device)
    counts = []
    for step in range(3):
        with _common.launch_log() as forward:
            loss = fast(x).square().mean()
        with _common.launch_log() as backward:
            loss.backward()
        assert fast.last_backend in KERNELS
        counts.append((_launches(forward, "pack_weights"), _launches(backward, "pack_weights_backward")))
        if step == 0:
            pack = next(r for r in forward if r.name == "pack_weights")
            assert pack.stage == "pack" and forward[0] is pack
            n_conv = 2 * 2 * SMALL["depth"] + 2 + 1 + (SMALL["depth"] if upsample == "transpose" else 0)
            assert pack.path_reason.startswith(f"{2 * n_conv} tensors")
            assert next(r for r in backward if r.name == "pack_weights_backward").stage == "pack.backward"
        if step == 1:
            optimizer.step()
        optimizer.zero_grad()
    assert counts == [(1, 1), (0, 1), (1, 1)]


def test_the_forward_after_an_optimizer_step_reads_the_updated_weights(device):
    """Two SGD steps, the packed weights cached in between: the second and third forwards' outputs and the final
    parameters follow the float64 reference's, step for step (a stale pack would give the first forward's logits
    again). An in-place edit under no_grad and load_state_dict are seen by the next forward too."""
    reference = UNet(**SMALL, upsample="transpose")
    fast = FastUNet(**SMALL, upsample="transpose")
    fast.load_state_dict(reference.state_dict())
    fast, reference = fast.to(device).train(), copy.deepcopy(reference).double().train()
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)
    outs = {}
    for model, cast in ((fast, lambda t: t.to(device)), (reference, torch.Tensor.double)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        outs[model is fast] = []
        for _ in range(3):
            optimizer.zero_grad()
            out = model(cast(x))
            (out - cast(target)).square().mean().backward()
            optimizer.step()
            outs[model is fast].append(out.detach().double().cpu())
    for step, (ours, theirs) in enumerate(zip(outs[True], outs[False], strict=True)):
        assert float((ours - theirs).norm() / theirs.norm()) <= 1e-5, step
    assert float((outs[False][2] - outs[False][0]).norm() / outs[False][0].norm()) > 1e-2  # the steps moved it
    with torch.no_grad():
        fast.head.weight.add_(1.0)
        reference.head.weight.add_(1.0)
    assert float((fast(x.to(device)).detach().double() - reference(x.double()).detach()).norm()) <= 1e-4
    state = {k: v + 0.5 if k.startswith("head") else v for k, v in reference.state_dict().items()}
    fast.load_state_dict(state), reference.load_state_dict(state)
    assert float((fast(x.to(device)).detach().double() - reference(x.double()).detach()).norm()) <= 1e-4


def test_the_cache_follows_requires_grad_and_dtype(device):
    """A parameter frozen after a forward gets no gradient from the next one (a new pack without its edge); a
    forward under autocast packs in the autocast dtype, and the next fp32 forward packs fp32 again."""
    fast = FastUNet(**SMALL, upsample="bilinear").to(device).train()
    x = torch.randn(1, 3, 8, 8, device=device)
    fast(x).sum().backward()
    fast.zero_grad(set_to_none=True)
    fast.head.weight.requires_grad_(False)
    with _common.launch_log() as records:
        fast(x).sum().backward()
    assert _launches(records, "pack_weights") == 1
    assert fast.head.weight.grad is None and fast.head.bias.grad is not None
    with torch.autocast(device.type, dtype=torch.bfloat16), _common.launch_log() as records:
        out = fast(x)
    assert out.dtype == torch.bfloat16
    (pack,) = [r for r in records if r.name == "pack_weights"]
    assert pack.args[-1].dtype == torch.bfloat16
    with _common.launch_log() as records:
        assert fast(x).dtype == torch.float32
    (pack,) = [r for r in records if r.name == "pack_weights"]
    assert pack.args[-1].dtype == torch.float32


def test_a_folding_norm_stays_on_torch_ops_and_the_launch_says_so(device):
    """Eval mode with gradients: BatchNorm folds (running statistics) into its conv, which the pack cannot express;
    those convs are folded, packed and cast by torch ops as before (their norms get gradients through the fold),
    the rest in the launch, whose record names the folded ones."""
    fast = FastUNet(**SMALL, upsample="transpose", norm="batch").to(device).eval()
    x = torch.randn(1, 3, 8, 8, device=device, requires_grad=True)
    with _common.launch_log() as records:
        fast(x).sum().backward()
    assert fast.last_backend in KERNELS and fast.last_backend_reason.endswith("backward kernels")
    (pack,) = [r for r in records if r.name == "pack_weights"]
    convs = 2 * (2 * SMALL["depth"] + 1)
    assert pack.path_reason.startswith(f"{2 * SMALL['depth'] + 2} tensors")  # the transposed convs and the head
    assert "folded by torch ops" in pack.path_reason and pack.path_reason.count(".conv") == convs
    assert fast.encoders[0].norm1.weight.grad is not None and fast.encoders[0].conv1.weight.grad is not None


def test_training_plan_weights_are_views_of_one_buffer(device):
    fast = FastUNet(**SMALL, upsample="transpose").to(device).train()
    plan, _ = build_training_plan(fast.fused_layout(), torch.float32, device, training=True)
    tensors = [s.weight for pair in (*plan.encoders, *plan.decoders) for s in pair]
    tensors += [s.bias for pair in (*plan.encoders, *plan.decoders) for s in pair]
    tensors += [plan.head.weight, plan.head.bias] + [u.conv.weight for u in plan.ups] + [u.conv.bias for u in plan.ups]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
