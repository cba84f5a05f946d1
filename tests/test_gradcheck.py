"""``torch.autograd.gradcheck`` in float64 on the kernels: FastUNet's forward and its backward kernels under the
interpreter, for every upsampling (bilinear, nearest, transposed conv), with and without BatchNorm, in training mode
(batch statistics) and in eval mode (folded BatchNorm), on tiny odd shapes; float64 parity with the reference; that
the launches really are the Triton kernels in float64; and that compiled kernels refuse float64.

gradcheck compares the backward kernels' vector-Jacobian products with central differences of the forward kernels,
so both sides run on the kernels. Its fast mode (one random direction per input: two forwards each, against the
backward's projection on the same direction) is what the interpreter affords; the parameters are one flat input, so
every parameter is perturbed in each check.
"""

from __future__ import annotations

import pytest
import torch
from test_training import FORBIDDEN, _AtenOps
from torch.func import functional_call

from fastunet import FastUNet, UNet
from fastunet.kernels import _common
from fastunet.kernels._common import INTERPRET, launch_log
from fastunet.parity import randomize_norm_stats

pytestmark = pytest.mark.skipif(
    not INTERPRET, reason="float64 runs on the kernels only under the interpreter (compiled kernels refuse it)"
)

TINY = {"in_channels": 3, "num_classes": 2, "base_channels": 4}
UPSAMPLES = ("bilinear", "nearest", "transpose")


def _model(upsample: str, norm: str | None, training: bool, depth: int = 1) -> FastUNet:
    model = FastUNet(**TINY, depth=depth, upsample=upsample, norm=norm, dtype=torch.float64)
    if norm is not None:
        randomize_norm_stats(model)  # fresh BatchNorms would fold to the identity in eval mode
    return model.train(training)


class _Functional:
    """The model as ``f(x, flat_parameters)`` for gradcheck. Each call runs on fresh copies of the buffers: a
    training-mode forward updates BatchNorm's running statistics, and gradcheck calls the forward many times, so the
    module's own buffers are never touched and every call starts from the same ones. The copies of each call are
    kept to show the forward did update them."""

    def __init__(self, model: FastUNet) -> None:
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        self.calls: list[dict[str, torch.Tensor]] = []

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).requires_grad_()

    def __call__(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [shape.numel() for shape in self.shapes])
        params = {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes, strict=True)}
        fresh = {name: b.clone() for name, b in self.buffers.items()}
        self.calls.append(fresh)
        return functional_call(self.model, {**params, **fresh}, (x,))


def _check_launches(model: FastUNet, records: list) -> None:
    """The forward and the backward ran on the Triton kernels under the interpreter, every tensor in float64."""
    assert model.last_backend == "triton-interpreter", model.last_backend_reason
    assert model.last_backend_reason.endswith("backward kernels"), model.last_backend_reason
    names = {r.name for r in records}
    # The backward's own launches (a recompute in PyTorch would launch nothing): weight gradients, the ReLU and pool
    # backward, the upsampling's adjoint, the batch-statistics norm's two sides.
    expected = {"conv3x3", "conv_weight_grad", "activation_pool_backward"}
    if model.upsample != "transpose":
        expected.add("upsample2x_adjoint")
    if model.norm == "batch" and model.training:
        expected |= {"norm_input_backward", "norm_stats_backward"}
    missing = {e for e in expected if not any(name == e or name.startswith(e + "+") for name in names)}
    assert not missing, (missing, sorted(names))
    dtypes = {a.dtype for r in records for a in r.args if isinstance(a, torch.Tensor) and a.is_floating_point()}
    assert dtypes == {torch.float64}, dtypes


def _gradcheck(model: FastUNet, x: torch.Tensor) -> _Functional:
    """gradcheck (fast mode) of the model with respect to ``x`` and every parameter; the launches checked."""
    before = {name: b.clone() for name, b in model.named_buffers()}
    function = _Functional(model)
    with launch_log() as records:
        assert torch.autograd.gradcheck(function, (x.requires_grad_(), function.flat()), fast_mode=True)
    _check_launches(model, records)
    for name, value in model.named_buffers():  # gradcheck's many forwards left the module's own buffers alone
        assert torch.equal(value, before[name]), name
    if model.norm == "batch" and model.training:  # ... and each forward did update its copies, as a training step does
        assert all(int(call["encoders.0.norm1.num_batches_tracked"]) == 1 for call in function.calls)
        first = function.calls[0]["encoders.0.norm1.running_mean"]
        assert not torch.equal(first, before["encoders.0.norm1.running_mean"])
    return function


def _case(upsample: str, norm: str | None, training: bool, *marks) -> pytest.param:
    name = f"{upsample}-{norm or 'plain'}-{'train' if training else 'eval'}"
    return pytest.param(upsample, norm, training, id=name, marks=marks)


# One image of 5 x 7 (pooled to 2 x 3, upsampled to 4 x 6 and padded back): each upsampling, BatchNorm with batch
# statistics and folded, and no norm, in both modes, across these four.
QUICK = [
    _case("bilinear", "batch", True),
    _case("nearest", None, False),
    _case("transpose", "batch", False),
    _case("transpose", None, True),
]
# Every combination at 9 x 11.
SWEEP = [
    _case(up, norm, training, pytest.mark.slow)
    for up in UPSAMPLES
    for norm in (None, "batch")
    for training in (True, False)
]


@pytest.mark.parametrize(("upsample", "norm", "training"), QUICK)
def test_gradcheck_float64(upsample, norm, training):
    _gradcheck(_model(upsample, norm, training), torch.randn(1, 3, 5, 7, dtype=torch.float64))


@pytest.mark.parametrize(("upsample", "norm", "training"), SWEEP)
def test_gradcheck_float64_sweep(upsample, norm, training):
    _gradcheck(_model(upsample, norm, training), torch.randn(1, 3, 9, 11, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # minutes of interpreter time a case on shared cores
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_gradcheck_float64_depth2(upsample):
    """Two levels, two images, 6 x 10 (odd 3 x 5 at the middle level, 1 x 2 at the bottom): BatchNorm with batch
    statistics."""
    _gradcheck(_model(upsample, "batch", True, depth=2), torch.randn(2, 3, 6, 10, dtype=torch.float64))


@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_float64_matches_the_reference(upsample):
    """Forward and gradients against the reference's float64 autograd, to float64 rounding: an fp32 step anywhere (a
    load, a statistic, an epilogue, a partial sum) would leave an error near 1e-7."""
    model = _model(upsample, "batch", True)
    reference = UNet(**TINY, depth=1, upsample=upsample, norm="batch", dtype=torch.float64).train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    grad = torch.randn(2, 2, 5, 7, dtype=torch.float64)
    found, expected = {}, {}
    for net, out in ((model, found), (reference, expected)):
        inp = x.clone().requires_grad_()
        with _AtenOps() as ops:
            net(inp).backward(grad)
        out["input"] = inp.grad
        out.update((name, p.grad) for name, p in net.named_parameters())
        out.update((name, b.clone()) for name, b in net.named_buffers())
        if net is model:
            forbidden = sorted({n for n in ops.names if n in FORBIDDEN or n.startswith(FORBIDDEN[:3])})
            assert not forbidden, forbidden
    assert model.last_backend == "triton-interpreter"
    for name, value in expected.items():
        got = found[name]
        assert got.dtype == value.dtype, name
        scale = value.double().norm().clamp_min(1e-300)
        assert float((got.double() - value.double()).norm() / scale) <= 1e-12, name


def test_float64_refused_when_compiled(monkeypatch):
    """Compiled kernels take float32, float16 and bfloat16: a float64 tensor is refused with what is supported,
    never run some other way."""
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(TypeError, match="float64 runs only under the interpreter.*float32, float16 or bfloat16"):
        _common.check_runnable(torch.zeros(1, 2, 2, 3, dtype=torch.float64), "input")
