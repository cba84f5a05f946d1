"""The plan cache of a fused module: one live plan, valid while nothing it was built from has changed.

A plan is built from the module's parameters and buffers (folded, packed, cast to the compute dtype, on the compute
device). The cache keeps one, with a *stamp* of what it was built from: every module's identity and type (module
surgery), each parameter's and buffer's storage, version, dtype and device, every BatchNorm ``eps``, and the compute
dtype and device. The next forward reuses the plan while the stamp matches, and rebuilds it otherwise; a rebuild
that launches the same way is copied into the live plan's tensors (a captured CUDA graph replays the new weights),
anything else replaces the plan, so a plan of another dtype or device is released, never kept beside it.

Plan tensors are the cache's own storage (see :func:`fastunet.ops.build_plan`): a refresh writes only to them.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Callable, Sequence

import torch

from fastunet import ops
from fastunet.ops import Plan


@dataclasses.dataclass(frozen=True)
class Stamp:
    """What a plan was built from. ``key``: a tuple of plain values (ids, versions, dtypes, eps) compared on every
    forward; ``objects``: the modules and tensors whose ids it holds, referenced weakly by a cached entry so that an
    id reused by a new object after the old one died cannot pass for it."""

    key: tuple
    objects: Sequence[object] = dataclasses.field(default=(), compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    device: torch.device
    key: tuple
    refs: tuple[weakref.ref, ...]
    plan: Plan

    def matches(self, dtype: torch.dtype, device: torch.device, key: tuple) -> bool:
        return (
            self.dtype == dtype
            and self.device == device
            and self.key == key
            and all(ref() is not None for ref in self.refs)
        )


class PlanCache:
    """One live plan per module, its stamp, and the lock that makes concurrent first forwards build it once.

    Pickles and deep copies of a cache are empty caches (the copy rebuilds on its first forward).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entry: _Entry | None = None

    def __reduce__(self):
        return (type(self), ())

    def __len__(self) -> int:
        """Number of live plans: 0 or 1."""
        return 0 if self._entry is None else 1

    @property
    def live(self) -> Plan | None:
        """The cached plan, if any (whether or not it is still valid)."""
        entry = self._entry
        return entry.plan if entry is not None else None

    def clear(self) -> None:
        with self._lock:
            self._entry = None

    def release_if_stale(self, stamp: Stamp | None) -> None:
        """Drop the live plan unless it was built from what ``stamp`` describes (called after ``.to()``, ``.cpu()``,
        ``.half()``: the old plan's memory is released then, not at the next forward)."""
        with self._lock:
            entry = self._entry
            if entry is not None and (stamp is None or not entry.matches(entry.dtype, entry.device, stamp.key)):
                self._entry = None

    def get(self, dtype: torch.dtype, device: torch.device, stamp: Stamp, build: Callable[[], Plan]) -> Plan:
        """The cached plan if ``stamp``, ``dtype`` and ``device`` match it, else ``build()``'s, refreshed into the
        live plan's tensors where it launches the same way, and cached in place of the old one."""
        entry = self._entry
        if entry is not None and entry.matches(dtype, device, stamp.key):
            return entry.plan
        with self._lock:
            entry = self._entry
            if entry is not None and entry.matches(dtype, device, stamp.key):
                return entry.plan
            plan = build()
            if entry is not None and ops.refresh_in_place(entry.plan, plan):
                plan = entry.plan
            refs = tuple(weakref.ref(obj) for obj in stamp.objects)
            self._entry = _Entry(dtype, device, stamp.key, refs, plan)
            return plan
