"""The state around the kernels: the plan never aliases the model's tensors, follows parameter and module changes
without rebuild storms, keeps one live plan, and the model's mode is the one the caller expects."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
from milesial_layout import MilesialUNet
from test_convert import float64_output, milesial
from test_unet_parity import build_pair
from torch import nn

import fastunet
from fastunet import FastUNet, FastUNetFallbackWarning, UNet, ops
from fastunet.parity import randomize_norm_stats
from tolerances import assert_network_close, precision_key

SMALL = {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}


def _storages(module: nn.Module) -> dict[int, str]:
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {t.untyped_storage().data_ptr(): name for name, t in named if t.numel()}


def _assert_plan_owns_its_storage(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    owned = _storages(model)
    for index, tensor in enumerate(ops.plan_tensors(model.plan(dtype, device))):
        pointer = tensor.untyped_storage().data_ptr()
        assert pointer not in owned, f"plan tensor {index} {tuple(tensor.shape)} is the storage of {owned[pointer]}"


def _grad_tolerance(device: torch.device) -> dict:
    """Gradients of a loss of the fused output: the output's own rounding (kernel vs PyTorch) enters them."""
    if precision_key(torch.float32, device) == "fp32":
        return {"rtol": 1e-4, "atol": 1e-6}
    return {"rtol": 2e-2, "atol": 1e-3}


def small_pair_with_norm(device):
    return build_pair(device, torch.float32, **SMALL, norm="batch")


# -- 1. the plan never aliases a parameter or buffer -----------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        pytest.param({**SMALL, "num_classes": 1}, id="one-class-head"),
        pytest.param({**SMALL, "norm": "batch"}, id="batchnorm"),
        pytest.param({"in_channels": 2, "num_classes": 1, "base_channels": 1, "depth": 1}, id="transpose-to-1"),
        pytest.param({**SMALL, "upsample": "bilinear"}, id="bilinear"),
    ],
)
def test_no_plan_tensor_shares_storage_with_a_parameter_or_buffer(device, config):
    fast, _ = build_pair(device, torch.float32, **config)
    x = torch.randn(1, config["in_channels"], 8, 8, device=device)
    with torch.no_grad():
        fast(x)
        _assert_plan_owns_its_storage(fast, torch.float32, device)
        for p in fast.parameters():  # a refreshed plan owns its storage too
            p.mul_(0.5)
        fast(x)
    _assert_plan_owns_its_storage(fast, torch.float32, device)


def test_converted_plan_owns_its_storage(device):
    model = MilesialUNet(3, 1, False, width=2, depth=1).to(device).eval()
    fast = fastunet.convert(model)
    with torch.no_grad():
        fast(torch.randn(1, 3, 8, 8, device=device))
    _assert_plan_owns_its_storage(fast, torch.float32, device)


def test_a_parameter_update_rebuilds_the_plan_once(device, monkeypatch):
    fast, _ = small_pair_with_norm(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    builds = []
    real_build = ops.build_plan

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(ops, "build_plan", counting_build)
    with torch.no_grad():
        fast(x)
        for p in fast.parameters():  # an optimizer-style in-place step
            p.add_(0.01)
        outputs = [fast(x) for _ in range(3)]
    assert len(builds) == 2, f"{len(builds)} plan builds for 1 + 3 forwards around one parameter update"
    assert torch.equal(outputs[0], outputs[2])


def test_two_forwards_after_an_optimizer_step_backward_like_the_reference(device):
    """The second forward must not write into a tensor the first one saved for backward."""
    fast, _ = small_pair_with_norm(device)
    reference = UNet(**SMALL, norm="batch").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    x1, x2 = torch.randn(2, 1, 3, 8, 8, device=device)
    for model in (fast, reference):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x1).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        (model(x1).square().mean() + model(x2).square().mean()).backward()
    assert fast.last_backend != "reference"
    for (name, p), (_, q) in zip(fast.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name, **_grad_tolerance(device))


def test_load_state_dict_with_assign_leaves_the_source_alone(device):
    torch.manual_seed(0)
    source = UNet(**SMALL).to(device).eval()
    fast = fastunet.convert(source)
    x = torch.randn(1, 3, 8, 8, device=device)
    before = {name: t.detach().clone() for name, t in source.state_dict().items()}
    with torch.no_grad():
        fast(x)
        torch.manual_seed(1)
        other = UNet(**SMALL).to(device)
        expected = copy.deepcopy(other).cpu().double().eval()(x.cpu().double())
        fast.load_state_dict(other.state_dict(), assign=True)
        out = fast(x)
        for name, value in source.state_dict().items():
            assert torch.equal(value, before[name]), f"{name} of the source was written by the fused model"
        assert_network_close(out, expected, precision_key(torch.float32, device))
        for p in source.parameters():  # the source no longer shares anything with fast
            p.add_(1.0)
        assert torch.equal(fast(x), out)


# -- 2. module surgery that changes an upsampling -------------------------------------------------------------------
def test_every_upsampling_replaced_in_a_converted_model(device):
    model = milesial(True).to(device)  # bilinear, align_corners=True, depth 3
    fast = fastunet.convert(model)
    x = torch.randn(1, 3, 19, 21, device=device)
    with torch.no_grad():
        fast(x)
        for name in ("up1", "up2", "up3"):
            nearest = nn.Upsample(scale_factor=2, mode="nearest").eval()
            getattr(fast, name).up = nearest
            getattr(model, name).up = nearest
        out = fast(x)
    assert fast.last_backend != "reference"
    assert_network_close(out, float64_output(model, x), precision_key(torch.float32, device))


def test_every_upsampling_replaced_in_a_fastunet(device):
    fast, _ = build_pair(device, torch.float32, **SMALL, upsample="bilinear", norm="batch")
    x = torch.randn(1, 3, 11, 13, device=device)
    with torch.no_grad():
        fast(x)
        for block in fast.decoders:
            block.up = nn.Upsample(scale_factor=2, mode="nearest").eval()
        out = fast(x)
        assert fast.last_backend != "reference"
        reference = copy.deepcopy(fast).cpu().double().train(False)
        expected = UNet.forward(reference, x.cpu().double())  # the reference math on the same modules
    assert_network_close(out, expected, precision_key(torch.float32, device))


# -- 7. one live plan per model ---------------------------------------------------------------------------------------
def _live_plan_tensor(fast: nn.Module, dtype: torch.dtype, device: torch.device) -> weakref.ref:
    return weakref.ref(ops.plan_tensors(fast.plan(dtype, device))[0])


def test_a_dtype_change_releases_the_old_plan(device):
    fast, _ = build_pair(device, torch.float32, **SMALL, norm=None)
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad():
        fast(x)
        old = _live_plan_tensor(fast, torch.float32, device)
        fast.half()
        fast(x.half())
    gc.collect()
    assert old() is None, "the float32 plan outlived .half()"
    assert len(fast._plans) == 1


def test_a_device_change_releases_the_old_plan(device):
    fast, _ = build_pair(device, torch.float32, **SMALL, norm=None)
    with torch.no_grad():
        fast(torch.randn(1, 3, 8, 8, device=device))
    old = _live_plan_tensor(fast, torch.float32, device)
    fast.to("meta")
    gc.collect()
    assert old() is None, f"the {device.type} plan outlived .to('meta')"


@pytest.mark.gpu
def test_a_cuda_plan_does_not_outlive_cpu():
    fast, _ = build_pair(torch.device("cuda"), torch.float32, **SMALL, norm=None)
    with torch.no_grad():
        fast(torch.randn(1, 3, 8, 8, device="cuda"))
    old = _live_plan_tensor(fast, torch.float32, torch.device("cuda"))
    fast.cpu()
    gc.collect()
    assert old() is None, "the CUDA plan outlived .cpu()"


# -- 8. modes ---------------------------------------------------------------------------------------------------------
def test_conversion_copies_each_modules_mode():
    """A training model with frozen BatchNorm layers (a common fine-tuning setup) converts to the same modes."""
    for source in (UNet(**SMALL, norm="batch"), milesial(True).train()):
        for module in source.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        fast = fastunet.convert(source)
        modes = {name: m.training for name, m in source.named_modules()}
        assert {name: m.training for name, m in fast.named_modules()} == modes, type(source).__name__


def test_conversion_copies_batchnorm_settings(device):
    source = UNet(**SMALL, norm="batch").to(device)
    randomize_norm_stats(source)
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps, module.momentum = 0.25, 0.5
    fast = fastunet.convert(source.eval())
    for name, module in fast.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert (module.eps, module.momentum) == (0.25, 0.5), name
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad():
        assert_network_close(fast(x), float64_output(source, x), precision_key(torch.float32, device))


def test_a_training_forward_without_gradients_warns_once(device):
    model = UNet(**SMALL, norm="batch").to(device)  # training mode, as modules start
    randomize_norm_stats(model)
    fast = fastunet.convert(model)
    model.eval()  # the mix-up: the source is put in eval mode, the converted module is not
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        with pytest.warns(FastUNetFallbackWarning, match=r"training mode .* gradients disabled.*\.eval\(\)"):
            fast(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastUNetFallbackWarning)
            fast(x)  # once per module
    assert fast.last_backend == "reference"


def test_a_training_forward_with_gradients_does_not_warn(device):
    fast = FastUNet(**SMALL, norm="batch").to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastUNetFallbackWarning)
        fast(torch.randn(2, 3, 8, 8, device=device)).sum().backward()


# -- the eval-mode backward ------------------------------------------------------------------------------------------
def test_the_backward_neither_calls_nor_switches_the_modules(device):
    """The backward differentiates the layout's math: no module runs (no hook fires) and no mode changes, so
    another thread may use the model meanwhile."""
    fast, _ = small_pair_with_norm(device)
    reference = UNet(**SMALL, norm="batch").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 9, 8, device=device, requires_grad=True)
    out = fast(x)
    fast.train()
    calls = []
    for module in fast.modules():
        module.register_forward_pre_hook(lambda module, args: calls.append((type(module).__name__, module.training)))
    grad = torch.randn_like(out)
    out.backward(grad)
    assert not calls, f"the backward ran modules: {calls[:3]}"
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
