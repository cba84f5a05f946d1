"""``fastunet.convert``: the supported layouts convert, share their tensors, keep their keys and match the original;
everything else is refused with the module's path and the reason."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from milesial_layout import MilesialUNet, Up
from torch import nn

import fastunet
from fastunet import ConversionError, ConvertedUNet, FastUNet, UNet
from fastunet.parity import randomize_norm_stats
from tolerances import assert_error_ratio, assert_network_close, precision_key


def milesial(bilinear: bool, width: int = 4, depth: int = 3, seed: int = 0, **kw) -> MilesialUNet:
    """A model with random weights and random (not default) BatchNorm statistics."""
    torch.manual_seed(seed)
    model = MilesialUNet(3, 2, bilinear, width=width, depth=depth, **kw)
    randomize_norm_stats(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def float64_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).cpu().double().eval()(x.detach().cpu().double())


# -- parity -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bilinear", [True, False], ids=["bilinear", "transpose"])
@pytest.mark.parametrize(
    "dtype, size",
    [
        pytest.param(torch.float32, (19, 21), id="fp32-odd"),
        pytest.param(torch.float16, (16, 24), id="fp16-even"),
    ],
)
def test_milesial_layout_matches_original(device, ieee_fp32, bilinear, dtype, size):
    model = milesial(bilinear).to(device, dtype)
    fast = fastunet.convert(model)
    assert isinstance(fast, ConvertedUNet)
    x = torch.randn(2, 3, *size, device=device).to(dtype)
    with torch.no_grad():
        out = fast(x)
    assert fast.last_backend in ("triton", "triton-interpreter"), fast.last_backend_reason
    assert out.dtype == dtype and out.shape == (2, 2, *size)
    expected = float64_output(model, x)
    assert_network_close(out, expected, precision_key(dtype, device))
    if dtype == torch.float16 and device.type == "cuda":
        with torch.no_grad():
            assert_error_ratio(out, model(x), expected, factor=2.0)


@pytest.mark.parametrize(
    "upsample",
    [
        pytest.param(nn.Upsample(scale_factor=2, mode="nearest"), id="nearest"),
        pytest.param(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), id="bilinear-half-pixel"),
        pytest.param(nn.UpsamplingBilinear2d(scale_factor=2), id="upsampling-bilinear2d"),
    ],
)
def test_other_interpolations(device, upsample):
    model = milesial(True)
    for name in ("up1", "up2", "up3"):
        getattr(model, name).up = copy.deepcopy(upsample)
    fast = fastunet.convert(model.eval()).to(device)
    x = torch.randn(1, 3, 18, 17, device=device)
    with torch.no_grad():
        out = fast(x)
    assert fast.last_backend != "reference"
    assert_network_close(out, float64_output(model, x), precision_key(out.dtype, device))


def test_mixed_dtypes_outside_autocast_are_refused(device):
    fast = fastunet.convert(milesial(False)).to(device)
    with pytest.raises(TypeError, match="input dtype torch.float16 does not match the parameters' dtype torch.float32"):
        fast(torch.randn(1, 3, 16, 16, device=device).half())
    with pytest.raises(ValueError, match="expected input with 3 channels, got 4"):
        fast(torch.randn(1, 4, 16, 16, device=device))
    with pytest.raises(ValueError, match="too small for depth 3: H and W must be at least 8"):
        fast(torch.randn(1, 3, 7, 16, device=device))


def test_milesial_layout_depth4_launches(device):
    """The original's four levels: the same fused plan as the reference layout (22 launches either way: one
    upsampled map per level, two convs)."""
    for bilinear, launches in ((True, 22), (False, 22)):
        fast = fastunet.convert(milesial(bilinear, width=2, depth=4))
        x = torch.randn(1, 3, 16, 16, device=device)
        assert len(fastunet.trace(fast, x)) == launches


def test_widths_are_read_from_the_weights(device):
    """Widths that do not double per level (a pruned model, say) convert as they are."""
    model = milesial(False, widths=(4, 6, 10, 12))
    fast = fastunet.convert(model).to(device)
    x = torch.randn(1, 3, 17, 18, device=device)
    with torch.no_grad():
        out = fast(x)
    assert fast.last_backend != "reference"
    assert_network_close(out, float64_output(model, x), precision_key(out.dtype, device))


# -- module contract -----------------------------------------------------------------------------------------------
def test_shares_tensors_and_keeps_keys():
    model = milesial(True)
    fast = fastunet.convert(model)
    assert list(fast.state_dict()) == list(model.state_dict())
    originals = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in list(fast.named_parameters()) + list(fast.named_buffers()):
        assert tensor is originals[name], name
    # Checkpoints load both ways, strictly.
    other = milesial(True, seed=5)
    fast.load_state_dict(other.state_dict(), strict=True)
    torch.testing.assert_close(model.inc.double_conv[0].weight, other.inc.double_conv[0].weight, rtol=0, atol=0)
    model.load_state_dict(fast.state_dict(), strict=True)


def test_parameter_updates_reach_the_next_forward(device):
    model = milesial(True).to(device)
    fast = fastunet.convert(model)
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad():
        before = fast(x)
        model.outc.conv.bias.add_(1.0)  # through the original: the tensors are shared
        model.up1.conv.double_conv[1].running_var.mul_(4.0)
        after = fast(x)
    assert not torch.equal(before, after)
    assert_network_close(after, float64_output(model, x), precision_key(after.dtype, device))


def test_train_eval_and_no_grad(device):
    model = milesial(False).to(device)
    fast = fastunet.convert(model)
    x = torch.randn(2, 3, 16, 16, device=device)
    fast.train()
    assert not model.training, "modes are the converted module's own"
    expected = copy.deepcopy(model).train()(x)  # the source's own forward, batch statistics
    out = fast(x)
    assert fast.last_backend != "reference" and fast.last_backend_reason == "training mode; backward kernels"
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert model.inc.double_conv[0].weight.grad is not None
    fast.eval()
    with torch.no_grad():
        y = fast(x)
    assert fast.last_backend != "reference" and not y.requires_grad


def test_eval_gradients_are_the_originals(device):
    model = milesial(True).to(device)
    fast = fastunet.convert(model)
    x = torch.randn(1, 3, 16, 16, device=device, requires_grad=True)
    fast(x).square().sum().backward()
    grad_x, grad_w = x.grad.clone(), model.inc.double_conv[0].weight.grad.clone()
    x.grad = None
    model.zero_grad()
    model(x).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, model.inc.double_conv[0].weight.grad)


def test_dtype_conversion_and_batch_independence(device):
    model = milesial(True)
    fast = fastunet.convert(model).to(device).half()
    assert model.inc.double_conv[0].weight.dtype == torch.float16  # shared tensors follow
    x = torch.randn(3, 3, 16, 16, device=device).half()
    with torch.no_grad():
        batched = fast(x)
        singles = torch.cat([fast(x[i : i + 1]) for i in range(3)])
    assert batched.dtype == torch.float16
    assert torch.equal(batched, singles)


def test_save_and_load_whole_module(device):
    model = milesial(False)
    fast = fastunet.convert(model).to(device)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, ConvertedUNet)
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
    # And the state_dict route: into a fresh original.
    fresh = MilesialUNet(3, 2, False, width=4, depth=3)
    fresh.load_state_dict(fast.state_dict(), strict=True)


def test_autocast_like_the_original(device):
    model = milesial(True).to(device)
    fast = fastunet.convert(model)
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad(), torch.autocast(device.type):
        out = fast(x)
        expected_dtype = model(x).dtype
    assert out.dtype == expected_dtype != torch.float32
    assert_network_close(out, float64_output(model, x), precision_key(out.dtype, device))


def test_fastunet_layouts():
    reference = UNet(3, 2, 4, 2)
    fast = fastunet.convert(reference)
    assert isinstance(fast, FastUNet) and fast.head.weight is reference.head.weight
    assert fastunet.convert(fast) is fast


# -- refusals -----------------------------------------------------------------------------------------------------
def _replace(path: str, module: nn.Module):
    def edit(model: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, module)

    return edit


@pytest.mark.parametrize(
    "edit, path, reason",
    [
        pytest.param(_replace("inc.double_conv.2", nn.GELU()), "inc.double_conv.2", "GELU", id="gelu"),
        pytest.param(
            _replace("down1.maxpool_conv.1.double_conv.1", nn.LocalResponseNorm(2)),
            "down1.maxpool_conv.1.double_conv.1",
            r"not a supported norm \(BatchNorm2d, InstanceNorm2d, GroupNorm\)",
            id="local-response-norm",
        ),
        pytest.param(
            _replace("inc.double_conv.3", nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)),
            "inc.double_conv.3",
            "dilation",
            id="dilation",
        ),
        pytest.param(
            _replace("up2.conv.double_conv.0", nn.Conv2d(16, 8, 3, padding=1, groups=4, bias=False)),
            "up2.conv.double_conv.0",
            "grouped",
            id="groups",
        ),
        pytest.param(
            _replace("up1.up", nn.Upsample(scale_factor=2, mode="bicubic")), "up1.up", "bicubic", id="bicubic"
        ),
        pytest.param(
            _replace("down2.maxpool_conv.0", nn.AvgPool2d(2)), "down2.maxpool_conv.0", "2x2 max-pool", id="avg-pool"
        ),
        pytest.param(_replace("outc.conv", nn.Conv2d(4, 2, 5, padding=2)), "outc.conv", "5", id="5x5-head"),
        pytest.param(
            _replace("inc.double_conv.1", nn.BatchNorm2d(4, track_running_stats=False)),
            "inc.double_conv.1",
            "running statistics",
            id="bn-no-stats",
        ),
    ],
)
def test_unsupported_layers_are_named(edit, path, reason):
    model = milesial(True)
    edit(model)
    with pytest.raises(ConversionError, match=rf"'{path}'.*{reason}"):
        fastunet.convert(model)


def test_unknown_models_are_refused():
    with pytest.raises(ConversionError, match=r"Sequential: ReLU at '1': the output comes from here, not from a conv"):
        fastunet.convert(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()))
    with pytest.raises(
        ConversionError, match="Sequential: the input: feeds '0', where the layout has the concatenation"
    ):
        fastunet.convert(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1)))
    with pytest.raises(ConversionError, match="Module has no nn.Conv2d"):
        fastunet.convert(nn.Module())
    with pytest.raises(ConversionError, match="expected an nn.Module"):
        fastunet.convert("model.pt")


class _CatUpFirst(Up):
    """The upsampled map concatenated before the skip (nnU-Net's order): the module names cannot tell."""

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(low)
        dy, dx = skip.shape[2] - up.shape[2], skip.shape[3] - up.shape[3]
        up = torch.nn.functional.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([up, skip], dim=1))


class _ScaledUp(Up):
    """A forward that doubles the upsampled map: the module names match the layout, the math does not."""

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return super().forward(2 * low, skip)


@pytest.mark.parametrize("bilinear", [True, False], ids=["bilinear", "transpose"])
def test_concatenation_order_is_read_from_the_forward(device, bilinear):
    """cat([up, skip]) in one decoder level and cat([skip, up]) in the others: the trace shows each level's order,
    and the plan reorders that level's weight rows so the kernels read the skip first."""
    model = milesial(bilinear)
    model.up3.__class__ = _CatUpFirst  # the same modules and weights, the other concatenation order
    fast = fastunet.convert(model)
    # up3 is the last decoder: level 0, beside the full-size skip.
    assert fast.fused_layout().up_first == (True, False, False)
    fast = fast.to(device).eval()
    x = torch.randn(2, 3, 19, 21, device=device)
    with torch.no_grad():
        out = fast(x)
    assert fast.last_backend != "reference"
    assert_network_close(out, copy.deepcopy(model).cpu().double()(x.double().cpu()), precision_key(out.dtype, device))


def test_a_forward_that_adds_a_step_is_refused_naming_it():
    model = milesial(True)
    model.up3.__class__ = _ScaledUp
    with pytest.raises(ConversionError, match=r"MilesialUNet: Tensor.mul in 'up3' \(_ScaledUp.forward\): not part of"):
        fastunet.convert(model)
    with pytest.raises(ConversionError, match=r"Tensor.mul in 'up3'"):  # the trace runs without verification too
        fastunet.convert(model, verify=False)


def test_a_module_whose_forward_was_replaced_is_refused_by_verification():
    """A torch.nn module is recorded as what its type computes; one whose forward was swapped on the instance does
    something its type does not show: only the float64 run can tell."""
    model = milesial(True)
    upsample = model.up2.up
    upsample.forward = lambda low: 2 * nn.Upsample.forward(upsample, low)
    with pytest.raises(ConversionError, match=r"does not compute what its recognised layout computes"):
        fastunet.convert(model)
    assert isinstance(fastunet.convert(model, verify=False), ConvertedUNet)  # the check can be skipped, knowingly


# -- edge cases: what convert must not get wrong ---------------------------------------------------------------
class _WithShortcut(nn.Module):
    """A double conv plus a residual 1x1 conv: a branch the layout does not have."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.double_conv = block.double_conv
        self.shortcut = nn.Conv2d(block.double_conv[0].in_channels, block.double_conv[3].out_channels, 1)
        nn.init.zeros_(self.shortcut.weight)
        nn.init.zeros_(self.shortcut.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x) + self.shortcut(x)


def test_an_extra_branch_is_refused_even_when_it_computes_zero():
    model = milesial(True)
    model.inc = _WithShortcut(model.inc)
    with pytest.raises(ConversionError, match=r"Tensor.add in 'inc' \(_WithShortcut.forward\): not part of"):
        fastunet.convert(model)


def test_modules_the_eval_forward_never_runs_are_left_out():
    """A module that never runs (nor has its tensors read) is no part of what the eval forward computes: it is left
    out of the layout and kept, shared, in the converted module (tests/test_convert_norms.py: one that runs with its
    result discarded is refused)."""
    model = milesial(True)
    model.unused = nn.Conv2d(4, 4, 1)
    model.gate = nn.Sigmoid()
    fast = fastunet.convert(model)
    assert isinstance(fast, ConvertedUNet)
    assert fast.get_parameter("unused.weight") is model.unused.weight
    layout = fast.fused_layout()
    assert all(spec.conv is not fast.unused for _, spec in layout.conv_specs()) and layout.head is not fast.unused


def test_a_module_that_runs_with_its_result_discarded_is_refused():
    class Gated(MilesialUNet):
        def forward(self, x):
            self.gate(x)
            return MilesialUNet.forward(self, x)

    model = Gated(3, 2, True, width=4, depth=3)
    model.gate = nn.Sigmoid()
    with pytest.raises(ConversionError, match=r"Gated: Sigmoid at 'gate': runs, but its result does not reach"):
        fastunet.convert(model.eval())


def test_unet_subclass_with_its_own_forward_is_refused():
    class Sigmoid(UNet):
        def forward(self, x):
            return super().forward(x).sigmoid()

    with pytest.raises(ConversionError, match="overrides forward"):
        fastunet.convert(Sigmoid(3, 2, 4, 2))


class _HelperUNet(MilesialUNet):
    """A forward that calls a method and reads a class attribute of its own class."""

    _head = "outc"

    def _finish(self, features: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._head)(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for i in range(1, self.depth + 1):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        features = skips.pop()
        for j in range(1, self.depth + 1):
            features = getattr(self, f"up{j}")(features, skips.pop())
        return self._finish(features)


class _SuperUNet(MilesialUNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def test_source_helpers_work_in_training_mode(device):
    torch.manual_seed(0)
    model = _HelperUNet(3, 2, True, width=4, depth=2).eval()
    # Unverified, training mode runs the source class's own forward, which calls the source's helpers.
    fast = fastunet.convert(model, verify=False).to(device).train()
    x = torch.randn(2, 3, 8, 8, device=device)
    torch.testing.assert_close(fast(x), copy.deepcopy(model).train()(x))
    assert fast.last_backend == "reference" and "not checked" in fast.last_backend_reason


def test_a_forward_that_cannot_run_on_the_converted_module_is_refused():
    """Zero-argument super() needs an instance of the source class: refused at convert time, not at train time."""
    torch.manual_seed(0)
    with pytest.raises(ConversionError, match="cannot run on the converted module"):
        fastunet.convert(_SuperUNet(3, 2, True, width=4, depth=2).eval())


def test_buffers_stay_shared_through_dtype_conversion():
    model = milesial(True)
    fast = fastunet.convert(model).half()
    norm, fused_norm = model.inc.double_conv[1], fast.inc.double_conv[1]
    assert norm.running_var is fused_norm.running_var and norm.running_var.dtype == torch.float16
    assert norm.weight is fused_norm.weight
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16, dtype=torch.float16))  # the source still runs: nothing left in float32


def test_module_surgery_reaches_the_next_forward(device):
    model = milesial(True).to(device)
    fast = fastunet.convert(model)
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad():
        fast(x)
        fast.up1.up = nn.Upsample(scale_factor=2, mode="nearest").eval()
        model.up1.up = fast.up1.up
        out = fast(x)
    assert_network_close(out, float64_output(model, x), precision_key(out.dtype, device))


def test_pickles_carry_no_plan_cache(device):
    model = milesial(False).to(device)
    fast = fastunet.convert(model)
    with torch.no_grad():
        fast(torch.randn(1, 3, 16, 16, device=device))
    assert fast._plans
    assert not copy.deepcopy(fast)._plans
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    assert not torch.load(buffer, weights_only=False)._plans


def test_activation_and_padding_messages():
    model = MilesialUNet(3, 2, True, width=4, depth=2)
    model.inc.double_conv = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
    )
    with pytest.raises(ConversionError, match=r"GELU at 'inc.double_conv.1': GELU is not a supported activation"):
        fastunet.convert(model)
    model = milesial(True)
    head = model.outc.conv
    model.outc.conv = nn.Conv2d(head.in_channels, head.out_channels, 1, padding="valid")
    assert isinstance(fastunet.convert(model.eval()), ConvertedUNet)
