"""Options and parametrization of the benchmark suite (``pytest bench/``; not part of the default test run).

Examples::

    pytest bench/ --benchmark-group-by=group
    pytest bench/ -k network --bench-config ref-bilinear-b16 --bench-dtype bfloat16
    pytest bench/ -k "stage and fastunet" --bench-dtype float16
    pytest bench/ --bench-providers fastunet,torch-eager,torch-compile --max-autotune-mode max-autotune-no-cudagraphs
    FASTUNET_AUTOTUNE=1 pytest bench/ -k network         # fastunet times its candidate tiles first

Defaults: the whole network for the reference config at 256x256 and 512x512, batch 1 and 16; every stage of the
reference config (bilinear and transposed-conv upsampling) at 512x512, batch 1, plus the standalone 1x1 head;
fp16, bf16 and fp32 (TF32, as cuDNN runs it by default); all four providers. That is several hundred cases, and
every torch-compile case compiles (max-autotune: often tens of seconds per stage): select with -k,
--bench-dtype, --bench-config, --stage-config or --bench-providers to keep a run short. Without CUDA everything is
collected and skipped.
"""

from __future__ import annotations

import gc

import pytest
import torch

from fastunet.kernels import INTERPRET
from fastunet.tooling.dtypes import DTYPES
from fastunet.tooling.providers import DEFAULT_COMPILE_MODE, PROVIDERS
from fastunet.tooling.shapes import CONFIGS, NETWORK_CONFIGS, STAGE_CONFIGS, bench_stages


def _names(value: str) -> list[str]:
    return [name for name in value.split(",") if name]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastunet-bench")
    group.addoption(
        "--bench-config",
        default=",".join(NETWORK_CONFIGS),
        help=f"whole-network configs from fastunet.tooling.shapes (default %(default)s; all: {','.join(CONFIGS)})",
    )
    group.addoption(
        "--stage-config",
        default=",".join(STAGE_CONFIGS),
        help="configs whose stages are benchmarked one by one (default %(default)s)",
    )
    group.addoption(
        "--bench-dtype",
        default=",".join(DTYPES),
        help="comma-separated compute dtypes (default %(default)s; float32 runs TF32 like cuDNN's default)",
    )
    group.addoption(
        "--bench-providers", default=",".join(PROVIDERS), help="comma-separated providers (default %(default)s)"
    )
    group.addoption(
        "--max-autotune-mode",
        default=DEFAULT_COMPILE_MODE,
        help="torch.compile mode of the torch-compile-max-autotune provider (default %(default)s; "
        "max-autotune-no-cudagraphs leaves out CUDA graphs)",
    )
    group.addoption("--bench-rounds", type=int, default=50, help="timed rounds per benchmark")
    group.addoption("--bench-warmup", type=int, default=5, help="untimed rounds after the first (compiling) call")


@pytest.fixture(scope="session")
def bench_options(request: pytest.FixtureRequest) -> dict:
    config = request.config
    return {
        "max_autotune_mode": config.getoption("--max-autotune-mode"),
        "rounds": config.getoption("--bench-rounds"),
        "warmup": config.getoption("--bench-warmup"),
    }


def _checked(values: list[str], known, option: str) -> list[str]:
    unknown = [value for value in values if value not in known]
    if unknown:
        raise pytest.UsageError(f"unknown {option} {unknown}; known: {list(known)}")
    return values


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    options = metafunc.config
    network_names = _checked(_names(options.getoption("--bench-config")), CONFIGS, "--bench-config")
    stage_names = _checked(_names(options.getoption("--stage-config")), CONFIGS, "--stage-config")
    providers = _checked(_names(options.getoption("--bench-providers")), PROVIDERS, "--bench-providers")
    dtype_names = _checked(_names(options.getoption("--bench-dtype")), DTYPES, "--bench-dtype")
    if "provider" in metafunc.fixturenames:
        # fastunet-graphs replays the whole network: stages have no graph of their own.
        stage_test = "stage" in metafunc.fixturenames
        metafunc.parametrize("provider", [p for p in providers if not (stage_test and p == "fastunet-graphs")])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", [DTYPES[name] for name in dtype_names], ids=dtype_names)
    if "stage" in metafunc.fixturenames:
        # Stage shapes do not depend on the dtype (only tile choices do): trace once in fp16.
        cases = [stage for name in stage_names for stage in bench_stages(CONFIGS[name])]
        metafunc.parametrize("stage", cases, ids=[stage.id for stage in cases])
    if "net_config" in metafunc.fixturenames:
        metafunc.parametrize("net_config", [CONFIGS[name] for name in network_names], ids=network_names)


@pytest.fixture(autouse=True)
def _cuda_only_and_cudnn_benchmark():
    """Skip without CUDA; run cuDNN with autotuning (``cudnn.benchmark``) and fp32 as TF32 (cuDNN's default for
    convolutions, also for matmuls inductor may pick), restoring the switches afterwards."""
    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA device")
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled kernels")
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
