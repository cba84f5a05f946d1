"""``convert`` reads a U-Net by what its forward computes, not by its module names: hand-written U-Nets under their
own names, both concatenation orders, valid convs with a cropped skip, every activation the layout describes,
replicate padding, pixel shuffle, functional calls; and refusals that name the model and the real blocker.

Two checks per model, both against the model's own forward:

* recognition: the recognised layout's math (``ops.layout_forward``) over the model's own modules, in float64, at a
  size other than the probe's, equals the model's forward;
* conversion: where the kernels run the layout, the fused output matches the model's float64 forward within the
  fp32 budget; where they cannot yet (``ops.unfused_reason``), ``convert`` refuses with that reason, the model's
  name and the module path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_convert import float64_output
from torch import nn

import fastunet
from fastunet import ConversionError, ConvertedUNet, ops
from fastunet.convert import recognize
from fastunet.parity import randomize_norm_stats
from tolerances import assert_network_close, precision_key


# -- helpers ------------------------------------------------------------------------------------------------------
def assert_recognized(model: nn.Module, size=(13, 22), batch: int = 2) -> ops.Layout:
    """The recognised layout's float64 math equals the model's own float64 forward at ``size``."""
    found = recognize(model)
    model64 = copy.deepcopy(model).double().eval()
    layout = found.recipe.resolve(model64)
    x = torch.randn(batch, layout.in_channels, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ops.layout_forward(layout, x), model64(x), rtol=1e-10, atol=1e-10)
    return found.recipe.resolve(model)


def assert_converts_or_names_the_gap(model: nn.Module, device, size=(13, 22), where: str | None = None) -> str:
    """Fused parity where the kernels run the recognised layout; otherwise the refusal with ``unfused_reason``'s
    words, the model's name and ``where`` (a module path). Returns which of the two was checked."""
    layout = recognize(model).recipe.resolve(model)
    reason = ops.unfused_reason(layout)
    if reason is None:
        fast = fastunet.convert(model)
        assert isinstance(fast, ConvertedUNet)
        fast = fast.to(device).eval()
        x = torch.randn(2, layout.in_channels, *size, device=device)
        with torch.no_grad():
            out = fast(x)
        assert fast.last_backend in ("triton", "triton-interpreter"), fast.last_backend_reason
        assert_network_close(out, float64_output(model, x), precision_key(out.dtype, device))
        return "fused"
    with pytest.raises(ConversionError) as info:
        fastunet.convert(model)
    message = str(info.value)
    assert f"convert: {type(model).__name__}: " in message, message
    assert reason.partition(": ")[2] in message or reason in message, (reason, message)
    assert "cannot run this U-Net yet" in message, message
    if where is not None:
        assert f"'{where}'" in message, (where, message)
    return "refused"


def _prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    randomize_norm_stats(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def _conv(c_in: int, c_out: int, k: int = 3, padding: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, padding=padding, bias=bias)


# -- one U-Net under three naming schemes -------------------------------------------------------------------------
class FlatNames(nn.Module):
    """Every layer an attribute of its own, one max-pool and one ReLU shared by all levels, functional cat."""

    def __init__(self, c_in: int = 3, n_cls: int = 2, w: int = 4) -> None:
        super().__init__()
        self.e1a, self.e1b = _conv(c_in, w), _conv(w, w)
        self.e2a, self.e2b = _conv(w, 2 * w), _conv(2 * w, 2 * w)
        self.ma, self.mb = _conv(2 * w, 4 * w), _conv(4 * w, 4 * w)
        self.t2, self.d2a, self.d2b = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), _conv(4 * w, 2 * w), _conv(2 * w, 2 * w)
        self.t1, self.d1a, self.d1b = nn.ConvTranspose2d(2 * w, w, 2, 2), _conv(2 * w, w), _conv(w, w)
        self.logits = nn.Conv2d(w, n_cls, 1)
        self.pool, self.act = nn.MaxPool2d(2), nn.ReLU(inplace=True)

    @staticmethod
    def _fit(up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        dy, dx = skip.shape[-2] - up.shape[-2], skip.shape[-1] - up.shape[-1]
        return F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])

    def forward(self, x):
        a = self.act(self.e1b(self.act(self.e1a(x))))
        b = self.act(self.e2b(self.act(self.e2a(self.pool(a)))))
        m = self.act(self.mb(self.act(self.ma(self.pool(b)))))
        u = self._fit(self.t2(m), b)
        d = self.act(self.d2b(self.act(self.d2a(torch.cat([b, u], 1)))))
        u = self._fit(self.t1(d), a)
        d = self.act(self.d1b(self.act(self.d1a(torch.cat([a, u], 1)))))
        return self.logits(d)


class ListNames(nn.Module):
    """ModuleLists of Sequentials, decoder steps interleaved in one list, F.relu and F.max_pool2d in forward."""

    def __init__(self, c_in: int = 3, n_cls: int = 2, w: int = 4) -> None:
        super().__init__()
        widths = [w, 2 * w, 4 * w]
        self.down = nn.ModuleList()
        for c_prev, c in zip([c_in, *widths], widths, strict=False):
            self.down.append(nn.Sequential(_conv(c_prev, c), _conv(c, c)))
        self.up = nn.ModuleList()
        for c in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(2 * c, c, 2, 2))
            self.up.append(nn.Sequential(_conv(2 * c, c), _conv(c, c)))
        self.out = nn.Conv2d(w, n_cls, 1)

    @staticmethod
    def _double(block, t):
        return F.relu(block[1](F.relu(block[0](t))))

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = self._double(block, x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in range(0, len(self.up), 2):
            skip = skips.pop()
            up = self.up[i](x)
            dy, dx = skip.shape[2] - up.shape[2], skip.shape[3] - up.shape[3]
            up = F.pad(up, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))
            x = self._double(self.up[i + 1], torch.cat((skip, up), dim=1))
        return self.out(x)


class DictNames(nn.Module):
    """A ModuleDict of blocks with names of their own, the skip kept in a dict."""

    def __init__(self, c_in: int = 3, n_cls: int = 2, w: int = 4) -> None:
        super().__init__()

        def block(a, b):
            return nn.Sequential(_conv(a, b), nn.ReLU(), _conv(b, b), nn.ReLU())

        self.parts = nn.ModuleDict(
            {
                "stem": block(c_in, w),
                "deeper": nn.Sequential(nn.MaxPool2d(2), block(w, 2 * w)),
                "floor": nn.Sequential(nn.MaxPool2d(2), block(2 * w, 4 * w)),
                "lift_b": nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2),
                "merge_b": block(4 * w, 2 * w),
                "lift_a": nn.ConvTranspose2d(2 * w, w, 2, stride=2),
                "merge_a": block(2 * w, w),
                "classes": nn.Conv2d(w, n_cls, 1),
            }
        )

    def forward(self, x):
        p = self.parts
        kept = {"a": p["stem"](x)}
        kept["b"] = p["deeper"](kept["a"])
        low = p["floor"](kept["b"])
        for level in ("b", "a"):
            up = p[f"lift_{level}"](low)
            skip = kept[level]
            up = nn.functional.pad(up, [0, skip.shape[-1] - up.shape[-1], 0, skip.shape[-2] - up.shape[-2]])
            low = p[f"merge_{level}"](torch.cat([skip, up], 1))
        return p["classes"](low)


def _same_weights(models: list[nn.Module]) -> None:
    """Copy the first model's parameters into the others in registration order (the same network)."""
    source = [p for p in models[0].parameters()]
    for model in models[1:]:
        for mine, theirs in zip(model.parameters(), source, strict=True):
            assert mine.shape == theirs.shape
            with torch.no_grad():
                mine.copy_(theirs)


def test_one_unet_under_three_naming_schemes(device):
    torch.manual_seed(3)
    models = [FlatNames().eval(), ListNames().eval(), DictNames().eval()]
    # DictNames registers a decoder's transposed conv before its convs, as FlatNames does; ListNames too.
    _same_weights(models)
    x = torch.randn(2, 3, 13, 22, device=device)
    outputs = []
    for model in models:
        assert_recognized(model)
        fast = fastunet.convert(model)
        assert isinstance(fast, ConvertedUNet)
        assert fast.state_dict().keys() == model.state_dict().keys()
        assert all(fast.get_parameter(n) is p for n, p in model.named_parameters())
        layout = fast.fused_layout()
        assert layout.depth == 2 and layout.join == "pad" and not any(layout.up_first)
        fast = fast.to(device).eval()
        with torch.no_grad():
            outputs.append(fast(x))
        assert fast.last_backend in ("triton", "triton-interpreter")
        assert_network_close(outputs[-1], float64_output(model, x), precision_key(outputs[-1].dtype, device))
    # One network: the three fused forwards agree with each other as well.
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=0)


# -- a configurable hand-written U-Net for the features -------------------------------------------------------------
class Level(nn.Module):
    """conv [+ BatchNorm] + activation, twice; ``convs``: how many groups (the layout has two)."""

    def __init__(self, c_in, c_out, act, norm=True, padding=1, convs=2):
        super().__init__()
        layers = []
        for i in range(convs):
            layers.append(_conv(c_in if i == 0 else c_out, c_out, padding=padding, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(copy.deepcopy(act))
        self.body = nn.Sequential(*layers)

    def forward(self, t):
        return self.body(t)


class Handmade(nn.Module):
    """Depth ``depth``, widths ``w * 2**level``; ``act`` a module (deep-copied per conv) or a function;
    ``up``: "transpose", "bilinear", "nearest", "preconv-bilinear", "pixelshuffle"; ``join``: "pad", "replicate",
    "crop" (with valid convs); ``up_first``: cat([up, skip]); ``head_k``: 1 or 3."""

    def __init__(
        self, c_in=3, n_cls=2, w=4, depth=2, act=None, norm=True, up="transpose", join="pad", up_first=False,
        head_k=1, functional_act=None, middle_convs=2,
    ):  # fmt: skip
        super().__init__()
        act = nn.ReLU() if act is None else act
        self.functional_act = functional_act
        self.join, self.up_first, self.mode = join, up_first, up
        padding = 0 if join == "crop" else 1
        widths = [w * 2**i for i in range(depth + 1)]
        if functional_act is not None:
            act = nn.Identity()
        self.enc = nn.ModuleList(
            Level(c_in if i == 0 else widths[i - 1], widths[i], act, norm, padding, middle_convs if i == 1 else 2)
            for i in range(depth + 1)
        )
        self.ups, self.dec = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(depth)):
            below, c = widths[i + 1], widths[i]
            if up == "transpose":
                self.ups.append(nn.ConvTranspose2d(below, c, 2, 2))
                up_c = c
            elif up == "pixelshuffle":
                shuffle = [_conv(below, 4 * c), nn.PixelShuffle(2), nn.ZeroPad2d((1, 0, 1, 0)), nn.AvgPool2d(2, 1)]
                self.ups.append(nn.Sequential(*shuffle))
                up_c = c
            elif up == "preconv-bilinear":
                self.ups.append(nn.Sequential(nn.Conv2d(below, c, 1), nn.Upsample(scale_factor=2, mode="bilinear")))
                up_c = c
            else:
                self.ups.append(nn.Identity())  # interpolated in forward (functional)
                up_c = below
            self.dec.append(Level(c + up_c, c, act, norm, padding))
        self.head = nn.Conv2d(w, n_cls, head_k, padding=head_k // 2)

    def _level(self, block, t):
        if self.functional_act is None:
            return block(t)
        for layer in block.body:
            t = layer(t)
            if isinstance(layer, (nn.BatchNorm2d,)) or (isinstance(layer, nn.Conv2d) and not any(
                isinstance(m, nn.BatchNorm2d) for m in block.body
            )):  # fmt: skip
                t = self.functional_act(t)
        return t

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.enc):
            x = self._level(block, x if i == 0 else F.max_pool2d(x, kernel_size=2))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.dec, strict=True):
            skip = skips.pop()
            if self.mode in ("bilinear", "nearest"):
                align = True if self.mode == "bilinear" else None
                u = F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=align)
            else:
                u = up(x)
            dy, dx = skip.shape[-2] - u.shape[-2], skip.shape[-1] - u.shape[-1]
            if self.join == "pad":
                u = F.pad(u, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            elif self.join == "replicate":
                u = F.pad(u, [0, dx, 0, dy], mode="replicate")
            else:
                skip = skip[:, :, dy // 2 : dy // 2 + u.shape[-2], dx // 2 : dx // 2 + u.shape[-1]]
            x = self._level(block, torch.cat([u, skip] if self.up_first else [skip, u], dim=1))
        return self.head(x)


def handmade(seed=0, **kw) -> Handmade:
    torch.manual_seed(seed)
    return _prepared(Handmade(**kw), seed)


@pytest.mark.parametrize("up_first", [False, True], ids=["skip-first", "up-first"])
@pytest.mark.parametrize("up", ["transpose", "bilinear", "nearest"])
def test_both_concatenation_orders(device, up, up_first):
    model = handmade(up=up, up_first=up_first)
    layout = assert_recognized(model)
    assert layout.up_first == (up_first, up_first)
    assert assert_converts_or_names_the_gap(model, device) == "fused"


def test_depths_one_and_three(device):
    for depth, size in ((1, (5, 7)), (3, (17, 18))):
        model = handmade(depth=depth, up="bilinear")
        assert assert_recognized(model, size).depth == depth
        assert assert_converts_or_names_the_gap(model, device, size) == "fused"


def test_valid_convs_and_a_cropped_skip(device):
    """The Ronneberger U-Net: unpadded 3x3 convs, the skip centre-cropped to the upsampled map."""
    model = handmade(join="crop", norm=False, up="transpose")
    layout = assert_recognized(model, size=(44, 45))
    assert layout.join == "crop" and all(spec.conv.padding == (0, 0) for _, spec in layout.conv_specs())
    assert assert_converts_or_names_the_gap(model, device, size=(44, 45), where="enc.0.body.0") == "fused"


def test_a_crop_off_centre_is_refused():
    class CeilCrop(Handmade):
        def forward(self, x):
            skip = self._level(self.enc[0], x)
            low = self._level(self.enc[1], F.max_pool2d(skip, 2))
            up = self.ups[0](low)
            dy, dx = skip.shape[-2] - up.shape[-2], skip.shape[-1] - up.shape[-1]
            top, left = (dy + 1) // 2, (dx + 1) // 2  # the extra row and column cropped at the top and left
            skip = skip[:, :, top : top + up.shape[-2], left : left + up.shape[-1]]
            return self.head(self._level(self.dec[0], torch.cat([skip, up], 1)))

    message = _refusal(CeilCrop(depth=1, join="crop", norm=False).eval())
    assert "Tensor.__getitem__ in CeilCrop.forward: the skip" in message and "not a centred crop" in message, message


ACTIVATIONS = {  # name: (Handmade's arguments, the activation kind recognised)
    "leaky_relu": (dict(act=nn.LeakyReLU(0.2)), "leaky_relu"),
    "prelu": (dict(act=nn.PReLU()), "prelu"),
    "silu": (dict(act=nn.SiLU()), "silu"),
    "relu6": (dict(act=nn.ReLU6()), "clamp"),
    "hardtanh": (dict(act=nn.Hardtanh(-0.5, 0.75)), "clamp"),
    "none": (dict(act=nn.Identity()), "none"),
    "F.leaky_relu": (dict(functional_act=lambda t: F.leaky_relu(t, 0.3)), "leaky_relu"),
    "F.silu": (dict(functional_act=F.silu), "silu"),
    "torch.clamp": (dict(functional_act=lambda t: torch.clamp(t, -1.0, 2.0)), "clamp"),
    "F.relu": (dict(functional_act=F.relu), "relu"),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation(device, name):
    kw, kind = ACTIVATIONS[name]
    model = handmade(up="bilinear", **kw)
    layout = assert_recognized(model)
    assert {spec.activation.kind for _, spec in layout.conv_specs()} == {kind}
    where = "enc.0.body.2" if "act" in kw and kind != "none" else None  # the module, named in a refusal
    assert assert_converts_or_names_the_gap(model, device, where=where) == "fused"


def test_prelu_slopes_are_shared_with_the_source():
    model = handmade(up="bilinear", act=nn.PReLU())
    layout = recognize(model).recipe.resolve(model)
    prelu = layout.encoders[0][0].activation.module
    assert prelu is model.enc[0].body[2] and prelu.weight is model.enc[0].body[2].weight


def test_replicate_padding(device):
    """MONAI's join: the upsampled map padded at the bottom/right by repeating its last row and column."""
    model = handmade(join="replicate")
    assert assert_recognized(model, size=(13, 23)).join == "replicate"
    assert assert_converts_or_names_the_gap(model, device) == "fused"


@pytest.mark.parametrize("up", ["pixelshuffle", "preconv-bilinear"])
def test_pixel_shuffle_and_a_conv_before_the_interpolation(device, up):
    model = handmade(up=up)
    layout = assert_recognized(model)
    spec = layout.ups[0]
    if up == "pixelshuffle":
        assert spec.mode == "pixelshuffle" and spec.blur and spec.conv is model.ups[-1][0]
    else:
        assert spec.mode == "bilinear" and spec.pre_conv is model.ups[-1][0]
    assert assert_converts_or_names_the_gap(model, device) == "fused"


def test_a_3x3_head(device):
    model = handmade(head_k=3, up="bilinear")
    assert assert_recognized(model).head.kernel_size == (3, 3)
    assert assert_converts_or_names_the_gap(model, device, where="head") == "fused"


def test_wrapped_handmade_model_converts(device):
    model = handmade(up="bilinear")
    with pytest.warns(fastunet.UnwrappedModuleWarning, match="converted the Handmade inside DataParallel"):
        fast = fastunet.convert(nn.DataParallel(model))
    assert isinstance(fast, ConvertedUNet) and fast.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(1, 3, 11, 9, device=device)
    with torch.no_grad():
        out = fast.to(device).eval()(x)
    assert fast.last_backend != "reference"
    assert_network_close(out, float64_output(model, x), precision_key(out.dtype, device))


# -- refusals name the blocker --------------------------------------------------------------------------------------
def _refusal(model: nn.Module) -> str:
    with pytest.raises(ConversionError) as info:
        fastunet.convert(model)
    return str(info.value)


def test_a_level_with_three_convs_is_refused_naming_it():
    message = _refusal(handmade(middle_convs=3))
    assert "Handmade: enc1: has 3 convs ('enc.1.body.0', 'enc.1.body.3', 'enc.1.body.6'" in message, message


def test_a_norm_of_an_unsupported_kind_is_refused_naming_the_path():
    """InstanceNorm2d and GroupNorm are recognised (tests/test_convert_norms.py); other norms are refused."""
    model = handmade(up="bilinear")
    model.enc[1].body[1] = nn.LocalResponseNorm(2)
    message = _refusal(model)
    expected = (
        "Handmade: LocalResponseNorm at 'enc.1.body.1': not a supported norm (BatchNorm2d, InstanceNorm2d, GroupNorm)"
    )
    assert expected in message, message


def test_3d_convs_are_refused_naming_the_path():
    model = handmade(up="bilinear")
    model.enc[0].body[0] = nn.Conv3d(3, 4, 3, padding=1, bias=False)
    assert "Handmade: Conv3d at 'enc.0.body.0': only 2-D U-Nets convert" in _refusal(model)


def test_a_residual_add_is_refused_naming_the_call():
    class Residual(Handmade):
        def forward(self, x):
            return super().forward(x) + 0.0 * x.mean(1, keepdim=True)

    message = _refusal(Residual(up="bilinear").eval())
    assert "Residual: Tensor.mean in Residual.forward: not part of the U-Net layout" in message, message


def test_an_in_place_write_is_refused_naming_it():
    """Written into with ``__setitem__`` (which returns nothing): the skip read afterwards is no longer the conv's
    output, and the trace says so, with or without the float64 comparison."""

    class ZeroedChannel(Handmade):
        def forward(self, x):
            skip = self._level(self.enc[0], x)
            low = self._level(self.enc[1], F.max_pool2d(skip, 2))
            skip[:, 0] = 0.0
            up = F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=True)
            up = F.pad(up, [0, skip.shape[-1] - up.shape[-1], 0, skip.shape[-2] - up.shape[-2]])
            return self.head(self._level(self.dec[0], torch.cat([skip, up], 1)))

    model = ZeroedChannel(depth=1, up="bilinear").eval()
    for verify in (True, False):
        with pytest.raises(ConversionError, match=r"ZeroedChannel: Tensor.__setitem__ in ZeroedChannel.forward"):
            fastunet.convert(model, verify=verify)


def test_bicubic_and_size_interpolation_are_refused():
    class Bicubic(Handmade):
        def forward(self, x):
            skip = self._level(self.enc[0], x)
            low = self._level(self.enc[1], F.max_pool2d(skip, 2))
            up = F.interpolate(low, scale_factor=2, mode="bicubic")
            up = F.pad(up, [0, skip.shape[-1] - up.shape[-1], 0, skip.shape[-2] - up.shape[-2]])
            return self.head(self._level(self.dec[0], torch.cat([skip, up], 1)))

    model = Bicubic(depth=1, up="bilinear").eval()
    assert "upsampling mode 'bicubic' is not fused" in _refusal(model)

    class ToSize(Bicubic):
        def forward(self, x):
            skip = self._level(self.enc[0], x)
            low = self._level(self.enc[1], F.max_pool2d(skip, 2))
            up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear")
            return self.head(self._level(self.dec[0], torch.cat([skip, up], 1)))

    assert "an interpolation to the skip's size is not 2x at odd sizes" in _refusal(ToSize(depth=1, up="bilinear"))


def test_an_activation_after_the_head_is_refused():
    class Sigmoid(Handmade):
        def forward(self, x):
            return torch.sigmoid(super().forward(x))

    message = _refusal(Sigmoid(up="bilinear").eval())
    assert "Sigmoid: torch.sigmoid in Sigmoid.forward: not a supported activation" in message, message
