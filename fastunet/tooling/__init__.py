"""Tooling around the forward path: what a forward launches, and what it should cost.

Nothing here runs in a forward, and no module of the forward path (``model``, ``ops``, ``convert``, ``kernels``, ...)
imports it. Each module is imported on its own; this package imports none of them.

* :mod:`~fastunet.tooling.trace`: the launches of one forward without running it (``fastunet.trace``), one traced
  configuration (:func:`~fastunet.tooling.trace.trace_config`) and the stage name of each launch.
* :mod:`~fastunet.tooling.roofline`: the roofline model (a model, not a measurement), fused and eager.
* :mod:`~fastunet.tooling.compile_report`: every kernel variant built for sm_90/sm_80 without a GPU; one CLI, one
  JSON schema (``fastunet report``, ``python -m bench.compile_report``).
* :mod:`~fastunet.tooling.issue_model`: the SASS issue model of the compiled main loops (a model).
* :mod:`~fastunet.tooling.shapes`, :mod:`~fastunet.tooling.providers`, :mod:`~fastunet.tooling.timing`: the
  benchmark configurations and stages, what each provider runs, and the GPU timing run behind ``fastunet bench``.
* :mod:`~fastunet.tooling.dtypes`: the dtype names every command accepts.
"""
