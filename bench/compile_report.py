"""The compile report, run from the repository root: ``python -m bench.compile_report --arch sm_90 --json FILE``.

The report itself ships in the package (:mod:`fastunet.tooling.compile_report`, also ``fastunet report``): the same
options, table and JSON schema. See its ``--help``.
"""

from __future__ import annotations

import sys

from fastunet.tooling.compile_report import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m bench.compile_report"))
