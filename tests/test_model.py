"""FastUNet as a module: checkpoints, dispatch, kernels really running, fusion, gradients, layouts, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_unet_parity import build_pair

import fastunet
from fastunet import FastUNet, UNet
from fastunet.kernels import _common, launch_log
from fastunet.parity import randomize_norm_stats
from tolerances import assert_network_close, precision_key

SMALL = {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}


def small_pair(device, upsample="transpose", norm=None, dtype=torch.float32):
    return build_pair(device, dtype, **SMALL, upsample=upsample, norm=norm)


# -- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize("norm", [None, "batch"])
def test_state_dicts_interchange_strictly(upsample, norm):
    reference = UNet(3, 2, 8, 3, upsample=upsample, norm=norm)
    fast = FastUNet(3, 2, 8, 3, upsample=upsample, norm=norm)
    assert list(reference.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(fast.state_dict(), strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, fast.state_dict()[key]), key


def test_from_reference_shares_parameters(device):
    reference = UNet(**SMALL).to(device).eval()
    fast = FastUNet.from_reference(reference)
    assert not fast.training
    for (name, p), (_, q) in zip(reference.named_parameters(), fast.named_parameters(), strict=True):
        assert p is q, name
    x = torch.randn(2, 3, 9, 8, device=device)
    with torch.no_grad():
        assert_network_close(fast(x), reference.double()(x.double()), precision_key(torch.float32, device))


# -- dispatch -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upsample", ["transpose", "bilinear", "nearest"])
def test_triton_kernels_run_and_launch_count(device, upsample):
    """The forward is the Triton kernels (not a PyTorch fallback): 5 * depth + 2 launches in every upsample mode
    (one upsampled map per decoder level); the head and the pooling are fused, no separate launch."""
    fast = FastUNet(3, 2, 4, 4, upsample=upsample).to(device).eval()
    with torch.no_grad(), launch_log() as records:
        fast(torch.randn(1, 3, 16, 17, device=device))
    assert fast.last_backend == ("triton-interpreter" if _common.INTERPRET else "triton")
    assert len(records) == 5 * 4 + 2
    names = [record.name for record in records]
    assert names.count("conv3x3+pool") == 4
    assert names.count("conv_transpose2x2" if upsample == "transpose" else "upsample2x") == 4
    assert names[-1] == "conv3x3+head"


def test_no_concat_buffer_and_no_head_feature_map(device, monkeypatch):
    """The decoder never materializes cat([skip, up]) and the last conv writes only the logits."""
    allocations = []
    real_alloc = _common.alloc

    def tracking_alloc(shape, *args, **kwargs):
        allocations.append(tuple(shape))
        return real_alloc(shape, *args, **kwargs)

    for module in (_common, sys.modules["fastunet.kernels.conv"], sys.modules["fastunet.ops"]):
        monkeypatch.setattr(module, "alloc", tracking_alloc)
    fast = FastUNet(3, 2, 4, 3, upsample="bilinear").to(device).eval()
    with torch.no_grad(), launch_log() as records:
        logits = fast(torch.randn(1, 3, 16, 16, device=device))
    widths = [4, 8, 16, 32]
    concat_channels = {widths[level] + widths[level + 1] for level in range(3)}  # bilinear: skip + low-res
    assert not [shape for shape in allocations if shape[-1] in concat_channels]
    full_res_features = [shape for shape in allocations if shape == (1, 16, 16, 4)]
    assert len(full_res_features) == 3  # enc0.conv1, enc0.conv2 (the skip), dec0.conv1: not dec0.conv2
    assert records[-1].bytes_written == logits.numel() * logits.element_size()


def test_cpu_without_interpreter_falls_back_visibly():
    """Outside the interpreter a CPU input runs the reference math, says so once, and gives its output."""
    script = textwrap.dedent(
        """
        import warnings, torch, fastunet
        torch.manual_seed(0)
        ref = fastunet.UNet(3, 2, 4, 2).eval()
        fast = fastunet.FastUNet.from_reference(ref)
        x = torch.randn(1, 3, 8, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fast(x)
            fast(x)
        fallback = [w for w in caught if issubclass(w.category, fastunet.FastUNetFallbackWarning)]
        assert len(fallback) == 1, caught
        assert fast.last_backend == "reference", fast.last_backend
        assert "CUDA" in fast.last_backend_reason
        assert torch.equal(out, ref(x))
        print("fallback-ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback-ok" in result.stdout


def test_training_mode_matches_the_reference(device):
    """Training mode runs the kernels with BatchNorm's batch statistics: the reference's output and running-stat
    updates, to the network budget (tests/test_training.py checks the gradients)."""
    reference = UNet(**SMALL, norm="batch").to(device)
    fast = FastUNet(**SMALL, norm="batch").to(device)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 8, 8, device=device)
    out, expected = fast(x), reference(x)
    assert fast.last_backend in ("triton", "triton-interpreter"), fast.last_backend_reason
    assert_network_close(out, expected, precision_key(torch.float32, device))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_eval_gradients_match_reference(device):
    fast, _ = small_pair(device, upsample="bilinear", norm="batch")
    reference = UNet(**SMALL, upsample="bilinear", norm="batch").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 9, 10, device=device)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 2, 9, 10, device=device)
    fast(x_fast).backward(grad)
    assert fast.last_backend in ("triton", "triton-interpreter")
    reference(x_ref).backward(grad)
    torch.testing.assert_close(x_fast.grad, x_ref.grad)
    for (name, p), (_, q) in zip(fast.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_autocast_behaves_like_reference(device):
    fast, reference64 = small_pair(device, upsample="bilinear", norm="batch")
    reference = UNet(**SMALL, upsample="bilinear", norm="batch").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 12, 9, device=device)
    with torch.no_grad(), torch.autocast(device.type):
        out = fast(x)
        expected_dtype = reference(x).dtype
    assert out.dtype == expected_dtype != torch.float32
    with torch.no_grad():
        assert_network_close(out, reference64(x.double().cpu()), precision_key(out.dtype, device))


# -- parameters changed after construction ---------------------------------------------------------------------------
def test_plan_follows_parameter_changes(device):
    fast, _ = small_pair(device, norm="batch")
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad():
        before = fast(x)
        other = UNet(**SMALL, norm="batch")
        randomize_norm_stats(other)
        fast.load_state_dict(other.state_dict())
        after_load = fast(x)
        expected = UNet(**SMALL, norm="batch").double().eval()
        expected.load_state_dict(other.state_dict())
        assert_network_close(after_load, expected(x.double().cpu()), precision_key(torch.float32, device))
        assert not torch.equal(before, after_load)
        for p in fast.parameters():  # an optimizer-style in-place update
            p.mul_(0.5)
        expected.load_state_dict(fast.state_dict())
        assert_network_close(fast(x), expected(x.double().cpu()), precision_key(torch.float32, device))
        fast.half()
        out_half = fast(x.half())
        assert out_half.dtype == torch.float16
        assert_network_close(out_half, expected(x.double().cpu()), "fp16")


# -- layouts, batch independence, determinism ------------------------------------------------------------------------
def test_batch_independence_and_determinism(device):
    fast, _ = small_pair(device, upsample="nearest")
    x = torch.randn(3, 3, 11, 9, device=device)
    with torch.no_grad():
        out = fast(x)
        assert torch.equal(out, fast(x))
        for i in range(3):
            assert torch.equal(out[i], fast(x[i : i + 1])[0])


@pytest.mark.parametrize("layout", ["channels-last", "offset-view"])
def test_input_layouts(device, layout):
    fast, _ = small_pair(device)
    x = torch.randn(2, 3, 10, 12, device=device)
    if layout == "channels-last":
        view = x.contiguous(memory_format=torch.channels_last)
    else:
        big = torch.zeros(2, 5, 13, 14, device=device)
        big[:, 1:4, 2:12, 1:13] = x
        view = big[:, 1:4, 2:12, 1:13]
        assert view.storage_offset() > 0
    with torch.no_grad():
        expected, out = fast(x), fast(view)
    assert torch.equal(out, expected)
    if layout == "channels-last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_errors(device):
    fast = FastUNet(**SMALL).to(device).eval()
    cases = [
        (torch.randn(3, 8, 8, device=device), ValueError, "4-D"),
        (torch.randn(1, 4, 8, 8, device=device), ValueError, "expected input with 3 channels, got 4"),
        (torch.ones(1, 3, 8, 8, dtype=torch.int64, device=device), TypeError, "floating-point"),
        (torch.randn(1, 3, 8, 8, device=device).half(), TypeError, "does not match the parameters' dtype"),
        (torch.randn(1, 3, 3, 8, device=device), ValueError, "at least 4"),
        (torch.randn(1, 3, 8, 8, device="meta"), RuntimeError, "parameters are on"),
    ]
    for x, error, message in cases:
        with pytest.raises(error, match=message):
            fast(x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fast([1.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 0}, "depth must be an int >= 1"),
        ({"upsample": "bicubic"}, "upsample must be one of"),
        ({"norm": "group"}, "norm must be one of"),
        ({"base_channels": 0}, "base_channels must be a positive int"),
        ({"upsample": "nearest", "align_corners": True}, "align_corners=True only applies"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    config = {"in_channels": 3, "num_classes": 2, **kwargs}
    for cls in (UNet, FastUNet):
        with pytest.raises(ValueError, match=message):
            cls(**config)


def test_trace_counts_reference_config():
    """FLOPs of the classic 64-channel depth-4 net at 512x512, counted independently: 2 * pixels * c_out * c_in * k^2
    per conv, summed by hand below."""
    records = fastunet.trace(
        UNet(3, 2, 64, 4, upsample="bilinear", device="meta"), torch.empty(1, 3, 512, 512, device="meta")
    )
    expected = 0
    for level in range(5):
        pixels, width = (512 >> level) ** 2, 64 << level
        expected += 2 * pixels * width * 9 * ((3 if level == 0 else width // 2) + width)
        if level < 4:
            expected += 2 * pixels * width * 9 * (3 * width + width)
    expected += 2 * 512 * 512 * 64 * 2
    assert len(records) == 22
    assert sum(r.flops for r in records if r.name.startswith("conv")) == expected
    assert round(expected / 1e9, 1) == 445.5


def test_trace_bytes_written_reference_config():
    """fp16 bytes written by the fused forward, counted map by map: every encoder conv output, the pooled maps,
    the upsampled maps, every decoder conv output but the last, which writes only the logits."""
    records = fastunet.trace(
        UNet(3, 2, 64, 4, upsample="bilinear", device="meta"),
        torch.empty(1, 3, 512, 512, dtype=torch.float16, device="meta"),
    )
    expected = 0
    for level in range(5):
        map_bytes = (512 >> level) ** 2 * (64 << level) * 2
        expected += 2 * map_bytes  # encoder conv1 and conv2 (the skip)
        if level < 4:
            expected += map_bytes // 4  # pooled
            expected += map_bytes if level == 0 else 2 * map_bytes  # decoder conv1 (+ conv2 above level 0)
            expected += map_bytes * 2  # the level below upsampled (twice this level's channels)
    expected += 512 * 512 * 2 * 2  # logits
    assert [r.bytes_written for r in records][-1] == 512 * 512 * 2 * 2
    assert sum(r.bytes_written for r in records) == expected


# -- autograd and module state (gradients come from the reference recompute of what the forward used) ---------------
def test_backward_recomputes_the_forward_eval_state(device):
    fast, _ = small_pair(device, norm="batch")
    reference = UNet(**SMALL, norm="batch").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 8, 8, device=device)
    grad = torch.randn(2, 2, 8, 8, device=device)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fast(x_fast)
    stats = {k: v.clone() for k, v in fast.state_dict().items() if "running" in k}
    fast.train()  # switched between forward and backward: the backward must still be the eval-mode one
    out.backward(grad)
    assert fast.training
    for key, value in stats.items():
        assert torch.equal(fast.state_dict()[key], value), key
    reference(x_ref).backward(grad)
    torch.testing.assert_close(x_fast.grad, x_ref.grad)


def test_double_backward_matches_reference(device):
    """A gradient penalty: second derivatives through the input gradient reach the parameters."""
    fast, _ = small_pair(device, norm="batch")
    reference = UNet(**SMALL, norm="batch").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 8, 8, device=device)
    for model in (fast, reference):
        x_in = x.clone().requires_grad_()
        out = model(x_in)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x_in, create_graph=True)
        (out.sum() + grad_x.square().sum()).backward()
    assert fast.last_backend in ("triton", "triton-interpreter")
    for (name, p), (_, q) in zip(fast.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_parameters_replaced_between_forward_and_backward_get_no_gradient(device):
    """As in PyTorch, the backward differentiates the tensors the forward read: replacements made since get none."""
    fast, _ = small_pair(device, norm="batch")
    reference = UNet(**SMALL, norm="batch").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 8, 8, device=device)
    used = dict(fast.named_parameters())
    out = fast(x)
    fast.load_state_dict({k: v.clone() for k, v in fast.state_dict().items()}, assign=True)
    out.sum().backward()
    reference(x).sum().backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(used[name].grad, p.grad, msg=name)
        assert fast.get_parameter(name).grad is None, name


def test_from_reference_keeps_modes_independent():
    reference = UNet(**SMALL, norm="batch")  # training mode, as modules start
    fast = FastUNet.from_reference(reference)
    assert fast.training
    fast.eval()
    assert reference.training and all(m.training for m in reference.modules())
    reference.eval()
    fast.train()
    assert not any(m.training for m in reference.modules())


def test_a_training_submodule_normalizes_with_batch_statistics(device):
    """One BatchNorm in training mode inside an eval model: that layer uses (and updates) batch statistics on the
    kernels, the others fold, as in the reference."""
    fast, _ = small_pair(device, norm="batch")
    reference = UNet(**SMALL, norm="batch").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    for model in (fast, reference):
        model.encoders[1].norm2.train()
    x = torch.randn(2, 3, 8, 8, device=device)
    out, expected = fast(x), reference(x)
    assert fast.last_backend in ("triton", "triton-interpreter") and "training mode" in fast.last_backend_reason
    assert_network_close(out, expected, precision_key(torch.float32, device))
    torch.testing.assert_close(fast.encoders[1].norm2.running_mean, reference.encoders[1].norm2.running_mean)
    assert int(fast.encoders[1].norm2.num_batches_tracked) == 1 and int(fast.encoders[0].norm1.num_batches_tracked) == 0


def test_plan_follows_batchnorm_eps(device):
    fast, _ = small_pair(device, norm="batch")
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad():
        before = fast(x)
        for module in fast.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = 0.5
        after = fast(x)
        expected = UNet(**SMALL, norm="batch").double().eval()
        expected.load_state_dict(fast.state_dict())
        for module in expected.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = 0.5
        assert not torch.equal(before, after)
        assert_network_close(after, expected(x.double().cpu()), precision_key(torch.float32, device))


def test_unfused_head_path(device, monkeypatch):
    """Past MAX_HEAD_CHANNELS the head is its own 1x1 launch (patched low here to run it on a small net)."""
    monkeypatch.setattr(sys.modules["fastunet.ops"], "MAX_HEAD_CHANNELS", 2)
    fast, reference64 = small_pair(device, upsample="bilinear")
    x = torch.randn(2, 3, 9, 11, device=device)
    with torch.no_grad(), launch_log() as records:
        out = fast(x)
    assert [r.name for r in records][-2:] == ["conv3x3", "conv1x1"]
    assert_network_close(out, reference64(x.double().cpu()), precision_key(torch.float32, device))


@pytest.mark.gpu
def test_float64_is_refused_on_the_gpu():
    """Compiled kernels take float32, float16 and bfloat16: float64 (which runs under the interpreter) is refused with
    what is supported, at construction and at the forward, never run some other way."""
    with pytest.raises(ValueError, match="float64 runs on the kernels only under the interpreter"):
        FastUNet(**SMALL, dtype=torch.float64)
    fast = FastUNet(**SMALL).cuda().double().eval()
    with pytest.raises(TypeError, match="expected float32, float16 or bfloat16, got torch.float64; float64 runs"):
        fast(torch.randn(1, 3, 8, 8, device="cuda", dtype=torch.float64))


def test_dtype_rejections():
    with pytest.raises(ValueError, match="FastUNet parameters: expected float32, float16 or bfloat16.*torch.complex64"):
        FastUNet(**SMALL, dtype=torch.complex64)
    fast = FastUNet(**SMALL).eval()
    fast.head.half()
    with pytest.raises(TypeError, match="all parameters in one dtype"):
        fast(torch.randn(1, 3, 8, 8))


def test_submodule_hooks_run_on_the_reference_path(device, ieee_fp32):
    fast, reference64 = small_pair(device)
    seen = []
    handle = fast.encoders[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad(), pytest.warns(fastunet.FastUNetFallbackWarning, match="forward hooks on encoders.1"):
        out = fast(x)
    assert seen and fast.last_backend == "reference"
    handle.remove()
    with torch.no_grad():
        assert_network_close(fast(x), reference64(x.double().cpu()), precision_key(torch.float32, device))
    assert fast.last_backend != "reference"
    torch.testing.assert_close(out, fast(x).detach(), rtol=1e-5, atol=1e-5)


def test_parameters_made_in_inference_mode(device):
    with torch.inference_mode():
        fast = FastUNet(**SMALL).to(device).eval()
    reference = UNet(**SMALL).eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad():
        out = fast(x)
        assert fast.last_backend != "reference" and not fast._plans
        assert_network_close(out, reference.double()(x.double().cpu()), precision_key(out.dtype, device))


def test_many_classes_leave_the_head_unfused(device):
    fast, reference64 = build_pair(
        device, torch.float32, in_channels=3, num_classes=80, base_channels=4, depth=1, upsample="bilinear", norm=None
    )
    x = torch.randn(1, 3, 6, 5, device=device)
    with launch_log() as records, torch.no_grad():
        out = fast(x)
    assert [r.name for r in records][-1] == "conv1x1" and len(records) == 8
    assert_network_close(out, reference64(x.double().cpu()), precision_key(out.dtype, device))


def test_from_reference_sharing_survives_to():
    reference = UNet(**SMALL, norm="batch")
    fast = FastUNet.from_reference(reference).to(torch.float16)
    assert reference.encoders[0].norm1.running_mean is fast.encoders[0].norm1.running_mean
    assert reference.encoders[0].norm1.running_mean.dtype == torch.float16
