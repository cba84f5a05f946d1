"""The dtype names the commands and tools accept: one table.

Each dtype has a long name (torch's: ``float16``) and a short one (``fp16``); every option that takes a dtype
accepts either spelling. Commands that time or check a network keep the long name in their output, the compile
report the short one (the names in its JSON and labels).
"""

from __future__ import annotations

import argparse

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_NAMES: dict[str, str] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_LONG_NAMES = {**{name: name for name in DTYPES}, **{short: name for name, short in SHORT_NAMES.items()}}


def _expected() -> str:
    return ", ".join(f"{name} ({short})" for name, short in SHORT_NAMES.items())


def dtype_name(text: str) -> str:
    """``float16`` or ``fp16`` -> ``float16``; anything else is refused with the names accepted (argparse type)."""
    name = _LONG_NAMES.get(str(text).strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"expected a dtype, one of {_expected()}, got {text!r}")
    return name


def short_dtype_name(text: str) -> str:
    """``float16`` or ``fp16`` -> ``fp16`` (argparse type)."""
    return SHORT_NAMES[dtype_name(text)]


def torch_dtype(text: str) -> torch.dtype:
    """``float16`` or ``fp16`` -> ``torch.float16``."""
    return DTYPES[dtype_name(text)]
