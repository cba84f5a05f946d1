"""Swap methods of Triton's interpreter builder for the duration of a ``with`` block (the tests' hooks into what
the interpreter does: masked loads and stores, maxnum and minnum)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def patched_builder(replacements: dict[str, Callable]) -> Iterator[object]:
    """Set each named method of the interpreter's builder to its replacement, yield the builder, restore it after
    (an instance attribute that did not exist before is removed again, so the class's method shows through)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    before = {name: vars(builder).get(name) for name in replacements}
    for name, function in replacements.items():
        setattr(builder, name, function)
    try:
        yield builder
    finally:
        for name, previous in before.items():
            if previous is None:
                delattr(builder, name)
            else:
                setattr(builder, name, previous)
