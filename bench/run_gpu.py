"""Time the U-Net on a GPU against eager PyTorch and torch.compile: the configurations of the benchmark table.

The timing run ships in the package (:mod:`fastunet.tooling.timing`, also behind ``fastunet bench``); this script is
its command line, with this checkout's ``bench/results`` as the default results folder. See ``--help``::

    python bench/run_gpu.py --quick
    TRITON_INTERPRET=1 python bench/run_gpu.py --dry-run --json /tmp/dry.json   # the plumbing on a CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastunet.tooling.timing import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/run_gpu.py", default_out=str(Path(__file__).resolve().parent / "results")))
