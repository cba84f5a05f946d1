"""Tensor sharing between a fused module and the model it was made from.

``FastUNet.from_reference`` and ``convert`` build a module whose parameters and buffers *are* the source's tensors.
PyTorch's ``.to()``, ``.half()``, ``.cuda()`` swap parameter data in place but replace buffers with new tensors,
which would silently end the sharing (BatchNorm statistics left behind, the source half-converted): this module
records which tensors are shared and points the source at the converted ones afterwards.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

from torch import nn


def _tensors(module: nn.Module) -> dict[str, object]:
    return dict(module.named_parameters()) | dict(module.named_buffers())


def shared_names(module: nn.Module, source: nn.Module) -> list[str]:
    """Names of the parameters and buffers that ``module`` and ``source`` hold as the same tensor object."""
    theirs = _tensors(source)
    return [name for name, tensor in _tensors(module).items() if theirs.get(name) is tensor]


def share_again(module: nn.Module, source: nn.Module, names: list[str]) -> None:
    """Point ``source``'s parameters and buffers ``names`` at ``module``'s current tensors of the same names."""
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        theirs, mine = source.get_submodule(prefix), module.get_submodule(prefix)
        table = "_parameters" if leaf in theirs._parameters else "_buffers"
        getattr(theirs, table)[leaf] = getattr(mine, table)[leaf]


class SourceLink:
    """A weak link from a fused module to its source model (the source may be deleted; pickles drop the link)."""

    def __init__(self, source: nn.Module) -> None:
        self._ref = weakref.ref(source)

    @property
    def source(self) -> nn.Module | None:
        return self._ref()

    @contextlib.contextmanager
    def kept(self, module: nn.Module) -> Iterator[None]:
        """Keep the tensors ``module`` shares with the source shared through a conversion done inside the block."""
        source = self.source
        names = shared_names(module, source) if source is not None else []
        yield
        if source is not None:
            share_again(module, source, names)
