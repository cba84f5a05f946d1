"""The kernels as torch custom ops: opcheck, torch.compile without graph breaks, CUDA graphs, threads."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from test_convert import milesial
from test_convert_structure import handmade
from test_unet_parity import build_pair
from torch import nn

import fastunet
from fastunet import ops
from fastunet.kernels.conv import pack_conv_transpose_weight, pack_conv_weight
from tolerances import assert_kernel_close, assert_network_close, precision_key

SMALL = {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}


def _nhwc(batch, height, width, channels, device, dtype=torch.float32):
    return torch.randn(batch, height, width, channels, device=device, dtype=dtype)


def _conv_args(
    device, c_in=5, c_out=6, *, up=None, up_mode="", align_corners=False, pool=False, head=0, nchw=False, padding=1,
    join="pad", activation="relu", slope=0.0, lo=0.0, hi=0.0, prelu=False, c_up=None,
):  # fmt: skip
    x = _nhwc(2, 7, 6, c_in, device)
    if c_up is None:  # the channels the conv reads from up (a transposed conv in the launch makes others)
        c_up = up.shape[-1] if up is not None else 0
    weight = pack_conv_weight(torch.randn(c_out, c_in + c_up, 3, 3, device=device))
    bias = torch.randn(c_out, device=device)
    head_w = torch.randn(c_out, head, device=device) if head else None
    head_b = torch.randn(head, device=device) if head else None
    slopes = torch.rand(c_out, device=device) if prelu else None
    return (x, weight, bias, up, head_w, head_b, slopes, 3, padding, up_mode, align_corners, join, activation,
            slope, lo, hi, pool, nchw)  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({}, id="plain"),
        pytest.param({"pool": True}, id="pool"),
        pytest.param({"head": 3, "nchw": True}, id="head-nchw"),
        pytest.param({"up_mode": "bilinear", "align_corners": True}, id="bilinear-ac"),
        pytest.param({"up_mode": "nearest"}, id="nearest"),
        pytest.param({"activation": "leaky_relu", "slope": 0.1, "pool": True}, id="leaky-relu-pool"),
        pytest.param({"activation": "prelu", "prelu": True, "head": 2}, id="prelu-head"),
        pytest.param({"activation": "clamp", "lo": -0.5, "hi": 0.5, "padding": 0, "pool": True}, id="clamp-valid"),
        pytest.param({"up_mode": "direct", "join": "replicate", "activation": "silu"}, id="replicate-silu"),
        pytest.param({"up_mode": "direct", "join": "crop", "padding": 0, "pool": True}, id="crop-valid"),
    ],
)
def test_conv_op_passes_opcheck(device, case):
    case = dict(case)
    if case.get("up_mode") == "direct":
        case["up"] = _nhwc(2, 6, 5, 4, device)
    elif case.get("up_mode"):
        case["up"] = _nhwc(2, 3, 3, 4, device)
    args = _conv_args(device, **case)
    torch.library.opcheck(torch.ops.fastunet.conv2d_nhwc.default, args)


def test_conv_op_2x2_stride2_passes_opcheck(device):
    """The 2x2 stride-2 conv (a transposed conv's input gradient) through the op: its fake output is H // 2 x W // 2
    (7 x 6 -> 3 x 3) as torch's (H + 2p - k) // s + 1, like the launch's, and it matches float64 F.conv2d."""
    x = _nhwc(2, 7, 6, 5, device)
    weight = torch.randn(4, 5, 2, 2, device=device)
    packed = weight.permute(2, 3, 1, 0).reshape(4 * 5, 4).contiguous()
    args = (x, packed, None, None, None, None, None, 2, 0, "", False, "pad", "none", 0.0, 0.0, 0.0, False, False, 2)
    torch.library.opcheck(torch.ops.fastunet.conv2d_nhwc.default, args)
    y = torch.ops.fastunet.conv2d_nhwc(*args)[0]
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), stride=2).permute(0, 2, 3, 1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_conv_op_reads_a_permuted_input(device):
    """The first conv of a forward reads the caller's NCHW tensor through a permuted view."""
    x = torch.randn(2, 5, 7, 6, device=device).permute(0, 2, 3, 1)
    args = (x, *_conv_args(device)[1:])
    torch.library.opcheck(torch.ops.fastunet.conv2d_nhwc.default, args)


def _unpack(w_packed: torch.Tensor, c_in: int, ksize: int = 3) -> torch.Tensor:
    """(ksize^2 c_in, c_out) packed weight back to torch's (c_out, c_in, ksize, ksize)."""
    return w_packed.view(ksize, ksize, c_in, -1).permute(3, 2, 0, 1)


def _fused_head_math(x, weight, bias, head_w, head_b):
    """A 3x3 conv + ReLU with a 1x1 head on NHWC maps in PyTorch: (logits, the activated map), both NHWC."""
    features = torch.relu(F.conv2d(x.permute(0, 3, 1, 2), _unpack(weight, x.shape[3]), bias, padding=1))
    features = features.permute(0, 2, 3, 1)
    return features @ head_w + head_b, features


@pytest.mark.parametrize("nchw", [True, False], ids=["nchw-logits", "nhwc-logits"])
def test_conv_op_with_head_map_stores_logits_and_the_map(device, nchw):
    """A training forward's last conv: the fused head's logits and, in the pooled map's place, the activated map
    under them (what the head's weight gradient reads), both against float64."""
    args = _conv_args(device, head=3, nchw=nchw)
    logits, features, *stats = torch.ops.fastunet.conv2d_nhwc(*args, head_map=True)
    x, weight, bias, _, head_w, head_b = (t.double().cpu() if t is not None else None for t in args[:6])
    expected_logits, expected_features = _fused_head_math(x, weight, bias, head_w, head_b)
    key = precision_key(torch.float32, device)
    assert_kernel_close(features, expected_features, 9 * 5, key)
    assert_kernel_close(logits, expected_logits, 9 * 5 * 6, key)
    assert logits.permute(0, 3, 1, 2).is_contiguous() == nchw and features.is_contiguous()
    assert all(t.numel() == 0 for t in stats)
    with pytest.raises(ValueError, match="head_map stores the map under a fused head: it needs head_weight and no"):
        torch.ops.fastunet.conv2d_nhwc(*_conv_args(device, head=3, pool=True), head_map=True)


def test_conv_op_with_head_map_gradients_match_float64(device):
    """The fused conv + head op's registered backward (the head's input and weight gradients, then the conv's)
    against float64 autograd of the same math, every differentiable input."""
    args = list(_conv_args(device, head=3, nchw=True))
    for index in (0, 1, 2, 4, 5):
        args[index] = args[index].detach().requires_grad_()
    logits, features, *_ = torch.ops.fastunet.conv2d_nhwc(*args, head_map=True)
    grad = torch.randn(logits.shape, device=device)
    found = torch.autograd.grad(logits, [args[i] for i in (0, 1, 2, 4, 5)], grad)
    inputs = [args[i].detach().double().cpu().requires_grad_() for i in (0, 1, 2, 4, 5)]
    expected_logits, _ = _fused_head_math(*inputs)
    expected = torch.autograd.grad(expected_logits, inputs, grad.double().cpu())
    key = precision_key(torch.float32, device)
    for name, got, want in zip(("x", "weight", "bias", "head weight", "head bias"), found, expected, strict=True):
        assert got.shape == want.shape, name
        k = 2 * 7 * 6 * 9 * 6  # the longest sum behind any of them: pixels by taps by channels
        assert_kernel_close(got, want, k, key)


def test_conv_transpose_op_passes_opcheck(device):
    x = _nhwc(2, 3, 5, 6, device)
    weight = pack_conv_transpose_weight(torch.randn(6, 4, 2, 2, device=device))
    args = (x, weight, torch.randn(4, device=device).repeat(4))
    torch.library.opcheck(torch.ops.fastunet.conv_transpose2x2_nhwc.default, args)


@pytest.mark.parametrize("valid_crop", [False, True], ids=["same", "valid-crop"])
def test_fake_output_matches_the_real_one(device, valid_crop):
    """Shapes and strides from the fake implementation are the kernel's own (torch.compile plans with them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if valid_crop:  # the output: the upsampled map's size (5x4), 2 smaller
        up = _nhwc(2, 5, 4, 3, device)
        args = _conv_args(device, head=3, nchw=True, pool=True, up=up, up_mode="direct", join="crop", padding=0)
    else:
        args = _conv_args(device, head=3, nchw=True, pool=True)
    real = torch.ops.fastunet.conv2d_nhwc(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = torch.ops.fastunet.conv2d_nhwc(*fake_args)
    for r, f in zip(real, fake, strict=True):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


# -- autograd registration and the backward ops -------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        pytest.param({}, id="plain"),
        pytest.param({"pool": True}, id="pool"),
        pytest.param({"up_mode": "direct"}, id="two-sources"),
        pytest.param({"up_mode": "bilinear", "align_corners": True}, id="bilinear-in-launch"),
        pytest.param({"head": 3, "nchw": True, "head_map": True}, id="head-with-map"),
    ],
)
def test_conv_op_autograd_passes_opcheck(device, case):
    """With inputs that require grad, opcheck also runs the registered autograd (fastunet.training) and its
    backward through AOT dispatch."""
    case = dict(case)
    kwargs = {"head_map": case.pop("head_map")} if "head_map" in case else {}
    if case.get("up_mode") == "direct":
        case["up"] = _nhwc(2, 7, 6, 4, device)
    elif case.get("up_mode"):
        case["up"] = _nhwc(2, 3, 3, 4, device)
    args = list(_conv_args(device, **case))
    for index in (0, 1, 2, 3, 4, 5):
        if args[index] is not None:
            args[index] = args[index].detach().requires_grad_()
    torch.library.opcheck(torch.ops.fastunet.conv2d_nhwc.default, tuple(args), kwargs)


@pytest.mark.parametrize(
    ("up_mode", "through_norm"),
    [("transpose", False), ("transpose", True), ("bilinear", True), ("nearest", True)],
)
def test_conv_op_upsampling_the_low_map_itself_passes_opcheck(device, up_mode, through_norm):
    """A training forward's decoder conv takes the low-resolution map (read through its norm, or not) and makes the
    upsampled map in its own launch (a transposed conv, or an interpolation): schema, fake implementation and the
    registered autograd, every differentiable input included."""
    low = _nhwc(2, 3, 3, 4, device)
    c_up = 3 if up_mode == "transpose" else 4
    args = list(_conv_args(device, c_in=5, up=low, up_mode=up_mode, c_up=c_up))
    kwargs = {}
    if up_mode == "transpose":
        kwargs["up_weight"] = pack_conv_transpose_weight(torch.randn(4, c_up, 2, 2, device=device))
        kwargs["up_bias"] = torch.randn(c_up, device=device).repeat(4)
    if through_norm:
        kwargs.update(up_scale=torch.rand(2, 4, device=device) + 0.5, up_shift=torch.randn(2, 4, device=device))
        kwargs["up_activation"] = "relu"
    for index in (0, 1, 2, 3):
        args[index] = args[index].detach().requires_grad_()
    kwargs = {k: v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    torch.library.opcheck(torch.ops.fastunet.conv2d_nhwc.default, tuple(args), kwargs)


def test_conv_op_operands_applied_ahead_change_no_value_and_no_gradient(device):
    """A training forward hands a decoder conv its skip and its transposed conv's low-resolution map already
    normalized (``x_applied``, ``up_applied``, made out of autograd's sight): the outputs equal the launch that
    normalizes on load, every gradient (through the norms' scale and shift too) equals that launch's, nothing of
    the applied maps is kept for the backward; opcheck runs the registered autograd with them; bad ones are
    refused."""
    from fastunet.kernels.stats import NormIn, normalize_nhwc

    low = _nhwc(2, 3, 3, 4, device)
    args = list(_conv_args(device, c_in=5, up=low, up_mode="transpose", c_up=3))
    scale, shift = torch.rand(2, 5, device=device) + 0.5, torch.randn(2, 5, device=device)
    up_scale, up_shift = torch.rand(2, 4, device=device) + 0.5, torch.randn(2, 4, device=device)
    kwargs = dict(
        in_scale=scale, in_shift=shift, in_activation="leaky_relu", in_slope=0.1,
        up_weight=pack_conv_transpose_weight(torch.randn(4, 3, 2, 2, device=device)),
        up_bias=torch.randn(3, device=device).repeat(4), up_scale=up_scale, up_shift=up_shift, up_activation="relu",
    )  # fmt: skip
    x_applied = normalize_nhwc(args[0], NormIn(scale, shift, "leaky_relu", 0.1))
    up_applied = normalize_nhwc(low, NormIn(up_scale, up_shift, "relu"))

    def run(ahead: dict):
        leaves = [args[i].detach().requires_grad_() for i in (0, 1, 2, 3)]
        named = {k: v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        y = torch.ops.fastunet.conv2d_nhwc(*leaves, *args[4:], **named, **ahead)[0]
        wrt = leaves + [v for v in named.values() if isinstance(v, torch.Tensor)]
        return y, torch.autograd.grad(y, wrt, torch.ones_like(y))

    y_load, grads_load = run({})
    y_ahead, grads_ahead = run({"x_applied": x_applied, "up_applied": up_applied})
    torch.testing.assert_close(y_ahead, y_load, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_ahead, grads_load, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and i < 4 else a for i, a in enumerate(args)]
    named = {k: v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    y = torch.ops.fastunet.conv2d_nhwc(*leaves, **named, x_applied=x_applied, up_applied=up_applied)[0]
    saved = {t.data_ptr() for t in _saved_tensors(y.grad_fn)}
    assert leaves[0].data_ptr() in saved and leaves[3].data_ptr() in saved  # the pre-norm maps are
    assert x_applied.data_ptr() not in saved and up_applied.data_ptr() not in saved
    torch.library.opcheck(
        torch.ops.fastunet.conv2d_nhwc.default, tuple(leaves), {**named, "x_applied": x_applied,
                                                                 "up_applied": up_applied}
    )  # fmt: skip
    with pytest.raises(ValueError, match="x_applied: x read through its norm, applied ahead; it needs in_scale"):
        torch.ops.fastunet.conv2d_nhwc(*args, x_applied=x_applied)
    with pytest.raises(ValueError, match=r"x_applied: expected x's shape \(2, 7, 6, 5\)"):
        torch.ops.fastunet.conv2d_nhwc(*args, **kwargs, x_applied=x_applied[:, :3])
    with pytest.raises(ValueError, match="up_applied: the low-resolution map read through its norm"):
        torch.ops.fastunet.conv2d_nhwc(*args, **{**kwargs, "up_scale": None, "up_shift": None}, up_applied=up_applied)


def _saved_tensors(node) -> list[torch.Tensor]:
    """The tensors autograd keeps for ``node`` and the nodes behind it (a custom op's saved ones included)."""
    found, seen, stack = [], set(), [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    value = getattr(node, name)
                except RuntimeError:
                    continue
                values = value if isinstance(value, (tuple, list)) else [value]
                found.extend(v for v in values if isinstance(v, torch.Tensor))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def test_conv_op_refuses_up_weights_without_the_transposed_mode(device):
    args = list(_conv_args(device, up=_nhwc(2, 3, 3, 4, device), up_mode="nearest"))
    weight_t = pack_conv_transpose_weight(torch.randn(4, 4, 2, 2, device=device))
    with pytest.raises(ValueError, match="up_weight and up_bias go with up_mode 'transpose', got up_mode='nearest'"):
        torch.ops.fastunet.conv2d_nhwc(*args, up_weight=weight_t)
    args = list(_conv_args(device, up=_nhwc(2, 7, 6, 4, device), up_mode="direct"))
    scale, shift = torch.ones(2, 4, device=device), torch.zeros(2, 4, device=device)
    with pytest.raises(ValueError, match="needs up_mode 'nearest', 'bilinear' or 'transpose', got 'direct'"):
        torch.ops.fastunet.conv2d_nhwc(*args, up_scale=scale, up_shift=shift)


def test_normalize_pool_op_passes_opcheck(device):
    """The eval forward's normalize+pool op with the whole map as its second output (odd size: the last row and
    column only in the whole map), against float64 math, and opcheck (schema, fake tensor, no autograd path)."""
    z = _nhwc(2, 5, 7, 3, device)
    scale, shift = torch.rand(2, 3, device=device) + 0.5, torch.randn(2, 3, device=device)
    whole, pooled = torch.ops.fastunet.normalize_pool_nhwc(z, scale, shift, "leaky_relu", 0.1)
    expected = F.leaky_relu(z.double() * scale.double()[:, None, None] + shift.double()[:, None, None], 0.1)
    torch.testing.assert_close(whole.double(), expected, rtol=1e-6, atol=1e-6)
    nchw = expected.permute(0, 3, 1, 2)
    torch.testing.assert_close(pooled.double(), F.max_pool2d(nchw, 2).permute(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.fastunet.normalize_pool_nhwc.default, (z, scale, shift, "relu"))


def test_upsample_and_transposed_ops_autograd_pass_opcheck(device):
    x = _nhwc(2, 3, 4, 5, device).requires_grad_()
    torch.library.opcheck(torch.ops.fastunet.upsample2x_nhwc.default, (x, "bilinear", False))
    weight = pack_conv_transpose_weight(torch.randn(5, 4, 2, 2, device=device)).requires_grad_()
    bias4 = torch.randn(4, device=device).repeat(4).detach().requires_grad_()
    torch.library.opcheck(torch.ops.fastunet.conv_transpose2x2_nhwc.default, (x, weight, bias4))


def test_backward_ops_pass_opcheck(device):
    x, y = _nhwc(2, 6, 5, 3, device), torch.relu(_nhwc(2, 6, 5, 4, device))
    weight = pack_conv_weight(torch.randn(4, 3, 3, 3, device=device))
    grad_y, grad_pooled = _nhwc(2, 6, 5, 4, device), _nhwc(2, 3, 2, 4, device)
    args = (x, weight, None, y, grad_y, grad_pooled, 3, 1, "relu", True, True, True, "direct", False, "pad")
    torch.library.opcheck(torch.ops.fastunet.conv2d_nhwc_backward.default, args)
    # A conv reading its input through a norm and followed by one (batch statistics): every gradient output.
    scale, shift = torch.rand(2, 3, device=device) + 0.5, torch.randn(2, 3, device=device)
    stats = (torch.randn(2, 4, device=device), torch.randn(2, 4, device=device))
    mean, var = torch.randn(4, device=device).expand(2, 4).contiguous(), torch.rand(4, device=device).expand(2, 4)
    args = (x, weight, None, y, grad_y, None, 3, 1, "none", False, False, True, "direct", False, "pad",
            scale, shift, "leaky_relu", 0.1, 0.0, 0.0, *stats, mean, var.contiguous(), torch.rand(4, device=device),
            4, 1e-5, True)  # fmt: skip
    torch.library.opcheck(torch.ops.fastunet.conv2d_nhwc_backward.default, args)
    grad = _nhwc(2, 7, 9, 3, device)
    torch.library.opcheck(torch.ops.fastunet.upsample2x_nhwc_backward.default, (grad, 4, 4, "nearest", False, 0, 0))
    low = _nhwc(2, 3, 4, 5, device)
    weight_t = pack_conv_transpose_weight(torch.randn(5, 4, 2, 2, device=device))
    args = (low, weight_t, _nhwc(2, 6, 8, 4, device), True, True)
    torch.library.opcheck(torch.ops.fastunet.conv_transpose2x2_nhwc_backward.default, args)


# -- torch.compile ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fastunet", "milesial", "instance"])
def test_compile_fullgraph_runs_the_kernels(device, which):
    """The eval forward compiled with fullgraph equals the eager one bit for bit; ``instance`` (MONAI BasicUNet's
    structure, InstanceNorm + LeakyReLU) also traces the normalize and normalize+pool+full ops applying each norm
    ahead of its conv readers."""
    if which == "fastunet":
        model, _ = build_pair(device, torch.float32, **SMALL, upsample="bilinear", norm="batch")
    elif which == "instance":
        from test_convert_norms import basic_like

        model = fastunet.convert(basic_like().eval()).to(device)
    else:
        model = fastunet.convert(milesial(False)).to(device)
    x = torch.randn(2, 3, 13, 12, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        eager = model(x)
        out = compiled(x)
    assert model.last_backend in ("triton", "triton-interpreter")
    assert torch.equal(out, eager)
    # A parameter update reaches the compiled model too (the plan is built inside the graph).
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
        assert torch.equal(compiled(x), model(x))


def test_compile_with_autograd_runs_the_reference_where_no_backward_kernel_covers_it(device):
    """A LeakyReLU layout has no backward kernels: compiled with autograd on, its forward is the reference math."""
    model = fastunet.convert(handmade(act=nn.LeakyReLU(0.2), norm=False).eval()).to(device)
    x = torch.randn(1, 3, 8, 8, device=device, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert model.last_backend == "reference" and "torch.compile with autograd on: enc0.conv1: the leaky_relu" in (
        model.last_backend_reason
    )
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    model.reference_forward(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_compile_and_cuda_graphs(mode):
    model, reference64 = build_pair(torch.device("cuda"), torch.float16, **SMALL, upsample="bilinear", norm="batch")
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.float16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    with torch.no_grad():
        eager = model(x)
        for _ in range(3):  # reduce-overhead records its CUDA graph on a later call
            out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert_network_close(out, reference64(x.double().cpu()), "fp16")


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    model, _ = build_pair(torch.device("cuda"), torch.float16, **SMALL, upsample="transpose", norm=None)
    static_x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        model(static_x)  # plan built and kernels compiled before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        fresh = torch.randn_like(static_x)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, model(fresh), rtol=0, atol=0)


@pytest.mark.gpu
def test_non_default_gpu(tf32):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    device = torch.device("cuda", 1)
    model, reference64 = build_pair(device, torch.float32, **SMALL, upsample="bilinear", norm=None)
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad():
        out = model(x)
    assert out.device == device and model.last_backend == "triton"
    assert_network_close(out, reference64(x.double().cpu()), "tf32")


# -- threads ------------------------------------------------------------------------------------------------------
def test_first_call_from_several_threads(device, monkeypatch):
    """Threads racing on a fresh model's first forward build its plan once and all get the sequential answer."""
    model, _ = build_pair(device, torch.float32, **SMALL, upsample="bilinear", norm="batch")
    x = torch.randn(1, 3, 12, 12, device=device)
    builds = []
    real_build = ops.build_plan

    def counting_build(*args, **kwargs):
        builds.append(threading.get_ident())
        return real_build(*args, **kwargs)

    monkeypatch.setattr(ops, "build_plan", counting_build)
    start = threading.Barrier(4)
    results, errors = [None] * 4, []

    def worker(i: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                results[i] = model(x)
        except Exception as error:  # reported below, not swallowed
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(builds) == 1
    with torch.no_grad():
        expected = model(x)
    for out in results:
        assert torch.equal(out, expected)


def test_tracing_records_the_custom_ops_and_caches_nothing(device):
    """make_fx sees one custom op per launch; the plan it traces never reaches a later eager call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model, reference64 = build_pair(device, torch.float32, **SMALL, upsample="transpose", norm="batch")
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad():
        graph = make_fx(model)(x)  # real tensors, traced: the kernels run once
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    # depth 2: 6 encoder convs, 4 decoder convs (the last with the head), 2 transposed convs.
    assert sum("fastunet.conv2d_nhwc" in t for t in targets) == 10
    assert sum("fastunet.conv_transpose2x2_nhwc" in t for t in targets) == 2
    assert not model._plans
    with torch.no_grad():
        assert_network_close(model(x), reference64(x.double().cpu()), precision_key(torch.float32, device))


def test_a_trace_in_another_thread_does_not_touch_a_forward(device):
    """Dry runs and launch logs are per thread: tracing while another thread runs the model changes nothing."""
    model, reference64 = build_pair(device, torch.float32, **SMALL, upsample="nearest", norm=None)
    x = torch.randn(1, 3, 12, 12, device=device)
    stop, traced, errors = threading.Event(), [], []

    def tracer() -> None:
        try:
            while not stop.is_set():
                traced.append(len(fastunet.trace(model, torch.empty(1, 3, 64, 64))))
        except Exception as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=tracer)
    thread.start()
    try:
        with torch.no_grad():
            outputs = [model(x) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert traced and set(traced) == {5 * 2 + 2}  # depth 2
    expected = reference64(x.double().cpu())
    for out in outputs:
        assert_network_close(out, expected, precision_key(out.dtype, device))
