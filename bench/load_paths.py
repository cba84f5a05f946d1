"""GPU check of the conv load paths on layers of the reference config (bf16, batch 16): TMA against pointer loads.

Per layer: the path each launch took and why, the two paths' outputs against each other, and CUDA-event times
(``triton.testing.do_bench`` median after warm-up, random data). Needs an sm_90 GPU for the TMA path; writes JSON
for ``bench/results/``::

    python -m bench.load_paths --json bench/results/load_paths.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

from fastunet.kernels import _common
from fastunet.kernels.conv import conv2d_nhwc, pack_conv_weight

# (stage, batch, c_in, c_out, height = width, c_up, pool)
LAYERS = (
    ("enc0.conv2", 16, 64, 64, 512, 0, True),
    ("enc1.conv2", 16, 128, 128, 256, 0, True),
    ("enc2.conv1", 16, 128, 256, 128, 0, False),
    ("enc3.conv1", 16, 256, 512, 64, 0, False),
    ("dec1.conv1", 16, 128, 128, 256, 128, False),
)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def measure(stage: str, batch: int, c_in: int, c_out: int, size: int, c_up: int, pool: bool) -> dict:
    """Both paths on one layer: path and reason, agreement, median ms and TFLOP/s."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = _nhwc(torch.randn(batch, c_in, size, size, device=device, dtype=dtype))
    up = _nhwc(torch.randn(batch, c_up, size, size, device=device, dtype=dtype)) if c_up else None
    weight = (torch.randn(c_out, c_in + c_up, 3, 3, device=device) / (9 * (c_in + c_up)) ** 0.5).to(dtype)
    w_packed, bias = pack_conv_weight(weight), (torch.randn(c_out, device=device) * 0.1).to(dtype)
    kwargs = {"pool": pool, "up": up, "up_mode": "direct" if c_up else None}
    flops = 2 * batch * size * size * c_out * 9 * (c_in + c_up)
    row: dict = {"stage": stage, "shape": [batch, c_in + c_up, c_out, size, size], "pool": pool}
    outputs = {}
    for path in ("pointer", "tma"):
        with _common.load_path(path), _common.launch_log() as log:
            outputs[path] = conv2d_nhwc(x, w_packed, bias, **kwargs)
            ms = triton.testing.do_bench(lambda: conv2d_nhwc(x, w_packed, bias, **kwargs), warmup=10, rep=50)
        record = log[0]
        tile = {key: record.constexprs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "TMA_ROWS")}
        row[path] = {"path": record.path, "reason": record.path_reason, "ms": ms, "tflops": flops / ms / 1e9}
        row[path] |= {"tile": tile, "launch": record.launch_options}
    (y_tma, pooled_tma), (y_ptr, pooled_ptr) = outputs["tma"], outputs["pointer"]
    row["max_abs_diff"] = (y_tma.float() - y_ptr.float()).abs().max().item()
    if pool:
        row["pooled_max_abs_diff"] = (pooled_tma.float() - pooled_ptr.float()).abs().max().item()
    row["pointer_over_tma"] = row["pointer"]["ms"] / row["tma"]["ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_paths", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the rows and the environment as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.load_paths: needs a CUDA GPU (timings come only from GPU runs)", file=sys.stderr)
        return 2
    rows = []
    for layer in LAYERS:
        rows.append(measure(*layer))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        env = {
            "device": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "commit": os.environ.get("FASTUNET_COMMIT"),
        }
        with open(args.json, "w") as handle:
            json.dump({"kind": "GPU timing: do_bench median ms, bf16 random data", "env": env, "layers": rows}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
