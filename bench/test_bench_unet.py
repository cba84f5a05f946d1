"""pytest-benchmark suite: each stage of the fused forward, and the whole network, per provider.

Groups: ``stage <config> <index> <label>`` (one launch of the fused forward against the same math in eager PyTorch
and torch.compile) and ``network <config>``. Every provider's output is checked against eager PyTorch before it is
timed. ``extra_info`` holds the FLOPs and the fused forward's compulsory bytes, and the TFLOP/s and GB/s they give
at the median time (for the torch providers that GB/s is an effective rate: they move more bytes than that).

Run on a GPU: ``pytest bench/ --benchmark-group-by=group`` (see ``bench/conftest.py`` for options).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from providers import eager_stage, make_input, make_model, network_callable, stage_callable, stage_tensors
from shapes import BenchConfig, Stage

from fastunet.parity import NETWORK_BUDGETS, math_mode, network_error
from fastunet.roofline import trace_config
from fastunet.trace import summarize

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark")
pytestmark = pytest.mark.gpu


def _check_close(outputs, expected, dtype: torch.dtype, what: str) -> None:
    """Outputs within twice the whole-network budget of eager PyTorch (both sides carry their own rounding)."""
    budget = NETWORK_BUDGETS[math_mode(dtype, "cuda")]
    for got, want in zip(outputs, expected, strict=True):
        error = network_error(got, want)
        assert error.rel_l2 <= 2 * budget.rel_l2 and error.max_norm <= 2 * budget.max_norm, (
            f"{what}: differs from eager PyTorch by rel-L2 {error.rel_l2:.2e}, max-norm {error.max_norm:.2e}"
        )


def _time(benchmark, fn: Callable, group: str, flops: int, nbytes: int, options: dict) -> None:
    """Time ``fn`` (each call synchronized) after a first call that compiles and autotunes."""
    fn()
    torch.cuda.synchronize()

    def target() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.group = group
    benchmark.extra_info.update({"flops": flops, "bytes": nbytes, "gflop": flops / 1e9, "mbytes": nbytes / 1e6})
    benchmark.pedantic(target, rounds=options["rounds"], warmup_rounds=options["warmup"], iterations=1)
    if benchmark.stats:
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["tflops"] = flops / median / 1e12
        benchmark.extra_info["gbps"] = nbytes / median / 1e9


def test_stage(benchmark, stage: Stage, provider: str, bench_options: dict) -> None:
    dtype = bench_options["dtype"]
    tensors = stage_tensors(stage, dtype, "cuda")
    fn = stage_callable(stage, provider, tensors, bench_options["compile_mode"])
    if provider != "torch-eager":
        _check_close(fn(), eager_stage(stage, tensors)(), dtype, f"{provider} {stage.id}")
    group = f"stage {stage.config} {stage.index:02d} {stage.label} ({stage.kind})"
    _time(benchmark, fn, group, stage.flops, stage.bytes_read + stage.bytes_written, bench_options)


def test_network(benchmark, net_config: BenchConfig, provider: str, bench_options: dict) -> None:
    dtype = bench_options["dtype"]
    model = make_model(net_config, dtype, "cuda")
    x = make_input(net_config, dtype, "cuda")
    fn = network_callable(model, x, provider, bench_options["compile_mode"])
    if provider == "fastunet":
        fn()
        assert fn.module.last_backend == "triton", fn.module.last_backend_reason
    if provider != "torch-eager":
        _check_close((fn(),), (network_callable(model, x, "torch-eager")(),), dtype, f"{provider} {net_config.name}")
    totals = summarize(trace_config(net_config.model_kwargs(), net_config.input_shape(), dtype))
    nbytes = totals["bytes_read"] + totals["bytes_written"]
    _time(benchmark, fn, f"network {net_config.name}", totals["flops"], nbytes, bench_options)
