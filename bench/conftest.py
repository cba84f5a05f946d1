"""Options and parametrization of the benchmark suite (``pytest bench/``; not part of the default test run).

Examples::

    pytest bench/ --benchmark-group-by=group
    pytest bench/ -k network --bench-config ref-bilinear-b16 --bench-dtype bfloat16
    pytest bench/ -k "stage and fastunet" --compile-mode max-autotune
    FASTUNET_AUTOTUNE=1 pytest bench/ -k network         # fastunet times its candidate tiles first

Every torch-compile case compiles (max-autotune: often tens of seconds per stage); select with -k or
--bench-providers to keep a run short.
"""

from __future__ import annotations

import gc

import _source_tree  # noqa: F401  (makes fastunet importable from the source tree)
import pytest
import torch
from providers import DEFAULT_COMPILE_MODE, PROVIDERS
from shapes import CONFIGS, STAGE_CONFIGS, stages

from fastunet.kernels import INTERPRET

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _names(value: str) -> list[str]:
    return [name for name in value.split(",") if name]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastunet-bench")
    group.addoption(
        "--bench-config",
        default=",".join(STAGE_CONFIGS),
        help=f"comma-separated configs from bench/shapes.py (default %(default)s; all: {','.join(CONFIGS)})",
    )
    group.addoption("--bench-dtype", default="float16", choices=sorted(DTYPES), help="compute dtype")
    group.addoption(
        "--bench-providers", default=",".join(PROVIDERS), help="comma-separated providers (default %(default)s)"
    )
    group.addoption(
        "--compile-mode",
        default=DEFAULT_COMPILE_MODE,
        help="torch.compile mode of the torch-compile provider (default %(default)s; max-autotune adds CUDA graphs)",
    )
    group.addoption("--bench-rounds", type=int, default=50, help="timed rounds per benchmark")
    group.addoption("--bench-warmup", type=int, default=5, help="untimed rounds after the first (compiling) call")


@pytest.fixture(scope="session")
def bench_options(request: pytest.FixtureRequest) -> dict:
    config = request.config
    return {
        "dtype": DTYPES[config.getoption("--bench-dtype")],
        "compile_mode": config.getoption("--compile-mode"),
        "rounds": config.getoption("--bench-rounds"),
        "warmup": config.getoption("--bench-warmup"),
    }


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    options = metafunc.config
    config_names = _names(options.getoption("--bench-config"))
    unknown = [name for name in config_names if name not in CONFIGS]
    if unknown:
        raise pytest.UsageError(f"unknown --bench-config {unknown}; known: {sorted(CONFIGS)}")
    providers = _names(options.getoption("--bench-providers"))
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        raise pytest.UsageError(f"unknown --bench-providers {bad}; known: {list(PROVIDERS)}")
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", providers)
    if "stage" in metafunc.fixturenames:
        dtype = DTYPES[options.getoption("--bench-dtype")]
        cases = [stage for name in config_names for stage in stages(CONFIGS[name], dtype)]
        metafunc.parametrize("stage", cases, ids=[stage.id for stage in cases])
    if "net_config" in metafunc.fixturenames:
        metafunc.parametrize("net_config", [CONFIGS[name] for name in config_names], ids=config_names)


@pytest.fixture(autouse=True)
def _cuda_only_and_cudnn_benchmark():
    """Skip without CUDA; run cuDNN with autotuning (``cudnn.benchmark``), restoring the switch afterwards."""
    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA device")
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled kernels")
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
