"""Roofline model of the benchmark configurations (a model, not a measurement).

The model itself is :mod:`fastunet.tooling.roofline` (installed with the package, also behind ``fastunet roofline``);
this script applies it to every configuration of the benchmark table (:mod:`fastunet.tooling.shapes`)::

    python bench/roofline.py                          # summary of every config, launches of ref-bilinear-b1
    python bench/roofline.py --launches ref-transpose-b16 --dtype bfloat16
"""

from __future__ import annotations

import argparse

from fastunet.parity import math_mode
from fastunet.tooling.dtypes import DTYPES, dtype_name
from fastunet.tooling.roofline import (
    H100,
    config_roofline,
    eager_estimate,
    format_ceilings,
    format_launches,
    format_summary,
)
from fastunet.tooling.shapes import CONFIGS


def main(argv: list[str] | None = None) -> int:
    """Print the per-config summary table, then the per-launch table of one config."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", type=dtype_name, default="float16", help="float16 (fp16), bfloat16 (bf16), float32")
    parser.add_argument("--launches", choices=list(CONFIGS), default="ref-bilinear-b1", metavar="CONFIG")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]

    print(format_ceilings(H100, math_mode(dtype, "cuda", True)))
    header = (
        f"{'config':<18} {'input':<18} {'launches':>8} {'GFLOP':>8} {'fused MB':>9} {'floor ms':>9} "
        f"{'eager kernels':>13} {'eager MB':>9} {'eager floor':>11}"
    )
    print(header)
    print("-" * len(header))
    for config in CONFIGS.values():
        net = config_roofline(config.model_kwargs(), config.input_shape(), dtype)
        eager = eager_estimate(config.model_kwargs(), config.input_shape(), dtype)
        print(
            f"{config.name:<18} {'x'.join(map(str, config.input_shape())):<18} {len(net.launches):>8} "
            f"{net.flops / 1e9:>8.1f} {net.bytes / 1e6:>9.0f} {net.floor_s * 1e3:>9.3f} {eager.kernels:>13} "
            f"{eager.bytes / 1e6:>9.0f} {eager.floor_s * 1e3:>11.3f}"
        )
    config = CONFIGS[args.launches]
    print(f"\n{config.name}: {config.note}")
    net = config_roofline(config.model_kwargs(), config.input_shape(), dtype)
    print(format_launches(net))
    print(format_summary(net, eager_estimate(config.model_kwargs(), config.input_shape(), dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
