"""CUDA graphs of the fused forward: one launch of the whole kernel sequence instead of 22 from Python.

A small forward (batch 1 at 512x512) spends more time launching its kernels from Python than running them: each
launch costs on the order of 0.1-0.2 ms of host time (checks, tile choice, Triton's own argument handling) against
tens of microseconds of GPU time. A CUDA graph records the launches once and replays them with one call.

:class:`GraphCache` keeps, per input signature (shape, strides, dtype, device, stream), a graph captured from the
plan's launches on a static input buffer. A forward copies its input into that buffer, replays the graph and
returns a fresh copy of the static output, so results never alias one another. A signature is captured on its
second forward (the first runs the plain launches: kernels compile and the autotuner settles there, outside any
capture). A plan rebuilt (new dtype, device, layout) drops every graph; a plan refreshed in place (new weights, same
shapes) keeps them, since the graphs read the plan's tensors. At most ``limit`` graphs are kept (least recently
used evicted): each holds the memory of its intermediate maps.

Opt-in (:meth:`fastunet.model.FusedForward.use_cuda_graphs`); plain launches run whenever a graph cannot: inputs
needing gradients, a compiler or another capture watching, a launch log or dry run open, CPU inputs.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import torch

from fastunet import ops


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_x: torch.Tensor
    static_out: torch.Tensor


class GraphCache:
    """Captured forwards of one module, per input signature (see the module doc). Thread-safe: one replay at a time
    per module (the static buffers are shared)."""

    def __init__(self, limit: int = 2) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        self.limit = limit
        self._lock = threading.Lock()
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._seen: set[tuple] = set()
        self._plan: ops.Plan | None = None
        self.captures = 0  # graphs captured so far (a test and bench aid)
        self.replays = 0

    def __reduce__(self):
        return (type(self), (self.limit,))

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._seen.clear()
            self._plan = None

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        return (tuple(x.shape), x.stride(), x.dtype, x.device, stream)

    def run(self, plan: ops.Plan, x: torch.Tensor) -> torch.Tensor | None:
        """The plan's output for ``x`` from a graph, or None where this call should launch plainly (a signature's
        first forward)."""
        key = self._key(x)
        with self._lock:
            if self._plan is not plan:
                self._graphs.clear()
                self._seen.clear()
                self._plan = plan
            entry = self._graphs.get(key)
            if entry is None:
                if key not in self._seen:
                    self._seen.add(key)
                    return None
                entry = self._capture(plan, x)
                self._graphs[key] = entry
                while len(self._graphs) > self.limit:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            entry.static_x.copy_(x)
            entry.graph.replay()
            self.replays += 1
            return entry.static_out.clone()

    def _capture(self, plan: ops.Plan, x: torch.Tensor) -> _Graph:
        static_x = torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype, device=x.device)
        static_x.copy_(x)
        graph = torch.cuda.CUDAGraph()
        # The capture runs on a side stream that first waits for the current one (torch.cuda.graph does both).
        with torch.cuda.graph(graph):
            static_out = ops.run_plan(plan, static_x)
        self.captures += 1
        return _Graph(graph, static_x, static_out)


__all__ = ["GraphCache"]
