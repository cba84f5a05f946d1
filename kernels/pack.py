"""Weight packing: every conv, transposed-conv and head weight and bias of a plan, cast and laid out for the kernels,
written into one flat buffer by one launch; and its adjoint, one launch from the packed gradients to the gradients
of the source tensors.

A *spec* says what each piece of the packed buffer is, as ``(kind, argument)`` pairs in a flat list of ints:

* :data:`CONV` (argument: a channel rotation ``r``): a conv weight ``(c_out, c_in, kh, kw)`` packed as the conv kernel
  reads it, ``(kh * kw * c_in, c_out)``, row ``tap * c_in + c``; packed channel ``c`` is source channel
  ``(c + r) % c_in`` (a decoder conv whose concatenation puts the upsampled map first reads the skip's channels
  first);
* :data:`TRANSPOSE`: a 2x2 transposed-conv weight ``(c_in, c_out, 2, 2)`` packed as ``(c_in, 4 * c_out)``, column
  ``(dy * 2 + dx) * c_out + channel``;
* :data:`VECTOR` (argument: a repeat count ``k``): a bias ``(c,)`` written ``k`` times, ``(k * c,)`` (the transposed
  conv's bias, once per sub-pixel);
* :data:`ZEROS` (argument: a length): zeros, for a layer without a bias; it takes no source tensor.

The sources (every kind but :data:`ZEROS`, in spec order) may have any strides and share one dtype; the pieces come
out in the packed dtype, each starting on a 16-byte boundary (a TMA descriptor's base must), in spec order. Each
piece is cut into *entries* (a rotated conv weight is two: the channels before and after the rotation point), each
entry into blocks of :data:`BLOCK` source elements; a host table of entries (sizes, strides, offsets) and one of
blocks, built once per layout, drive both kernels, one program per block. The sources are reached through a table
of their addresses (built once per set of addresses): the launch reads every parameter wherever it lives.

The adjoint gathers: each source element sums the packed gradient at the places it was written to (``k`` places for
a repeated bias) in fp32, in a fixed order, and is stored once in the sources' dtype, into one flat buffer holding
each source's gradient contiguous, one after another. NaN and infinities pass through both directions unchanged.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from fastunet.kernels._common import (
    INTERPRET,
    SUPPORTED_DTYPES,
    LaunchCache,
    LaunchRecord,
    acc_type,
    alloc,
    check_runnable,
    is_dry_run,
    launch_guard,
    record_launch,
    recording,
    to_storage,
)

__all__ = [
    "BLOCK",
    "CONV",
    "TRANSPOSE",
    "VECTOR",
    "ZEROS",
    "pack_pieces",
    "pack_weights",
    "pack_weights_adjoint",
    "source_shapes",
]

CONV, TRANSPOSE, VECTOR, ZEROS = 0, 1, 2, 3
_KIND_NAMES = {CONV: "conv", TRANSPOSE: "transpose", VECTOR: "vector", ZEROS: "zeros"}
BLOCK = 1024  # source elements per program

# Columns of the entry table (int64). The entry's elements are indexed (i0, i1, i2, i3), i3 fastest, in the order
# that makes the packed writes contiguous; each set of strides maps that index to an element offset.
_NUMEL = tl.constexpr(0)
_SIZES = tl.constexpr(1)  # sizes of dims 1, 2, 3 (dim 0's is numel / their product)
_SRC_STRIDES = tl.constexpr(4)
_DST_STRIDES = tl.constexpr(8)  # inside the piece (row-major over the piece's packed shape)
_GRAD_STRIDES = tl.constexpr(12)  # inside the source's contiguous gradient
_SRC_OFFSET = tl.constexpr(16)  # first element inside the source (a rotated conv's second entry)
_PIECE_START = tl.constexpr(17)  # the piece's first element in the packed buffer
_PIECE_OFFSET = tl.constexpr(18)  # the entry's first element inside the piece
_REPEAT = tl.constexpr(19)
_REPEAT_STRIDE = tl.constexpr(20)
_GRAD_START = tl.constexpr(21)  # the source's first element in the flat gradient buffer
_HAS_SOURCE = tl.constexpr(22)
_FIELDS = 23


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _entry_index(geometry_ptr, blocks_ptr, FIELDS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's entry (its table row), its elements' 4-D indices and their mask."""
    pid = tl.program_id(0)
    entry = tl.load(blocks_ptr + 2 * pid)
    first = tl.load(blocks_ptr + 2 * pid + 1)
    row = geometry_ptr + entry * FIELDS
    idx = first + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < tl.load(row + _NUMEL)
    size3 = tl.load(row + _SIZES + 2)
    size2 = tl.load(row + _SIZES + 1)
    size1 = tl.load(row + _SIZES)
    i3 = idx % size3
    rest = idx // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return entry, row, mask, i0, i1, i2, i3


@triton.jit
def _offset(row, column, i0, i1, i2, i3):
    """Element offset of (i0, i1, i2, i3) through the four strides at ``row[column:column + 4]``."""
    return (
        i0 * tl.load(row + column)
        + i1 * tl.load(row + column + 1)
        + i2 * tl.load(row + column + 2)
        + i3 * tl.load(row + column + 3)
    )


@triton.jit
def _pack_weights_kernel(
    geometry_ptr,  # int64 (entries, FIELDS)
    blocks_ptr,  # int64 (programs, 2): entry, first element
    sources_ptr,  # int64 (entries, 2): the source's address (bytes), whether there is one (else zeros)
    ref_ptr,  # a source: its element type is every source's
    out_ptr,  # (total,) the packed buffer
    FIELDS: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """``out[piece + dst(i)] = cast(source[src(i)])`` for a block of one entry's elements (``repeat`` copies, one
    ``repeat_stride`` apart; zeros for an entry without a source). One program per block of :data:`BLOCK`
    elements: a memory-bound copy whose packed writes are contiguous."""
    entry, row, mask, i0, i1, i2, i3 = _entry_index(geometry_ptr, blocks_ptr, FIELDS, BLOCK)
    source = tl.load(sources_ptr + 2 * entry).to(ref_ptr.dtype)  # the address, as a typed pointer
    # As a vector: a scalar predicate in a load's mask is refused by newer interpreters.
    present = (tl.zeros_like(i0) + tl.load(sources_ptr + 2 * entry + 1)) != 0
    src = tl.load(row + _SRC_OFFSET) + _offset(row, _SRC_STRIDES, i0, i1, i2, i3)
    dst = tl.load(row + _PIECE_START) + tl.load(row + _PIECE_OFFSET) + _offset(row, _DST_STRIDES, i0, i1, i2, i3)
    value = tl.load(source + src, mask=mask & present, other=0.0).to(acc_type(out_ptr.dtype.element_ty))
    value = to_storage(value, out_ptr.dtype.element_ty, INTERPRETER)
    repeat = tl.load(row + _REPEAT)
    step = tl.load(row + _REPEAT_STRIDE)
    for r in range(0, repeat):
        tl.store(out_ptr + dst + r * step, value, mask=mask)


@triton.jit
def _pack_weights_adjoint_kernel(
    geometry_ptr,  # int64 (entries, FIELDS)
    blocks_ptr,  # int64 (programs, 2): entry, first element (entries with a source only)
    grads_ptr,  # int64 (entries, 2): the address of the entry's piece gradient, whether there is one (else zero)
    ref_ptr,  # a piece gradient: its element type is every piece gradient's
    out_ptr,  # (sum of the sources' sizes,) the sources' gradients, each contiguous
    FIELDS: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """``out[grad(i)] = sum over r of piece_grad[dst(i) + r * repeat_stride]``, summed in fp32 (fp64 for float64
    sources) in order ``r = 0, 1, ...`` and stored once in the sources' dtype (a missing piece gradient counts as
    zero)."""
    entry, row, mask, i0, i1, i2, i3 = _entry_index(geometry_ptr, blocks_ptr, FIELDS, BLOCK)
    grad = tl.load(grads_ptr + 2 * entry).to(ref_ptr.dtype)
    present = (tl.zeros_like(i0) + tl.load(grads_ptr + 2 * entry + 1)) != 0  # a vector, as in the pack
    dst = tl.load(row + _PIECE_OFFSET) + _offset(row, _DST_STRIDES, i0, i1, i2, i3)
    repeat = tl.load(row + _REPEAT)
    step = tl.load(row + _REPEAT_STRIDE)
    acc_t: tl.constexpr = acc_type(out_ptr.dtype.element_ty)  # fp32; fp64 for float64 parameters
    total = tl.zeros([BLOCK], dtype=acc_t)
    for r in range(0, repeat):
        total += tl.load(grad + dst + r * step, mask=mask & present, other=0.0).to(acc_t)
    out = tl.load(row + _GRAD_START) + _offset(row, _GRAD_STRIDES, i0, i1, i2, i3)
    tl.store(out_ptr + out, to_storage(total, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Layout: pieces, entries and blocks of a spec (host side, derived once per signature)
# ---------------------------------------------------------------------------------------------------------------
def _pairs(spec) -> list[tuple[int, int]]:
    if len(spec) % 2 or not all(isinstance(v, int) for v in spec):
        raise ValueError(f"pack spec: expected (kind, argument) pairs of ints, got {list(spec)}")
    pairs = [(spec[i], spec[i + 1]) for i in range(0, len(spec), 2)]
    for kind, argument in pairs:
        if kind not in _KIND_NAMES:
            raise ValueError(f"pack spec: unknown kind {kind} (expected one of {sorted(_KIND_NAMES)})")
        if kind in (VECTOR, ZEROS) and argument < 1:
            raise ValueError(f"pack spec: a {_KIND_NAMES[kind]} piece needs an argument >= 1, got {argument}")
    return pairs


def _check_shape(kind: int, argument: int, shape: tuple[int, ...], index: int) -> None:
    what = f"pack source {index} ({_KIND_NAMES[kind]})"
    if kind == CONV:
        if len(shape) != 4:
            raise ValueError(f"{what}: expected a (c_out, c_in, kh, kw) weight, got shape {shape}")
        if not 0 <= argument < max(shape[1], 1):
            raise ValueError(f"{what}: the channel rotation must lie in [0, {shape[1]}), got {argument}")
    elif kind == TRANSPOSE:
        if len(shape) != 4 or tuple(shape[2:]) != (2, 2):
            raise ValueError(f"{what}: expected a (c_in, c_out, 2, 2) weight, got shape {shape}")
    elif len(shape) != 1:
        raise ValueError(f"{what}: expected a 1-D bias, got shape {shape}")


def _piece_shape(kind: int, argument: int, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if kind == CONV:
        c_out, c_in, kh, kw = shape
        return (kh * kw * c_in, c_out)
    if kind == TRANSPOSE:
        return (shape[0], 4 * shape[1])
    if kind == VECTOR:
        return (argument * shape[0],)
    return (argument,)


def source_shapes(spec, shapes) -> list[tuple[int, ...]]:
    """The sources' shapes from their flattened form (``ndim, *sizes`` per source, as the adjoint op takes them)."""
    out, i = [], 0
    shapes = list(shapes)
    while i < len(shapes):
        ndim = shapes[i]
        out.append(tuple(shapes[i + 1 : i + 1 + ndim]))
        i += 1 + ndim
    expected = sum(1 for kind, _ in _pairs(spec) if kind != ZEROS)
    if len(out) != expected:
        raise ValueError(f"pack: the spec takes {expected} source tensors, got {len(out)} shapes")
    return out


def pack_pieces(spec, shapes, dtype: torch.dtype) -> tuple[list[tuple[int, tuple[int, ...]]], int]:
    """Where each piece of the packed buffer lies: ``([(first element, packed shape)] in spec order, total size)``;
    each piece starts on a 16-byte boundary. ``shapes``: the sources' shapes (spec order, :data:`ZEROS` taking
    none)."""
    align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    shapes = list(shapes)
    expected = sum(1 for kind, _ in _pairs(spec) if kind != ZEROS)
    if len(shapes) != expected:
        raise ValueError(f"pack: the spec takes {expected} source tensors, got {len(shapes)}")
    pieces, start, sources = [], 0, iter(shapes)
    for index, (kind, argument) in enumerate(_pairs(spec)):
        shape = None
        if kind != ZEROS:
            shape = tuple(next(sources, None) or ())
            _check_shape(kind, argument, shape, index)
        packed = _piece_shape(kind, argument, shape)
        start = -(-start // align) * align
        pieces.append((start, packed))
        start += _numel(packed)
    return pieces, start


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


@dataclasses.dataclass(frozen=True)
class _Layout:
    pieces: tuple[tuple[int, tuple[int, ...]], ...]
    total: int  # packed elements
    grad_total: int  # source elements
    rows: tuple[tuple[int, ...], ...]  # the entry table
    entry_piece: tuple[int, ...]  # each entry's piece
    entry_source: tuple[int, ...]  # each entry's source (-1: none)
    blocks: tuple[tuple[int, int], ...]  # (entry, first element) per program of the pack
    adjoint_blocks: tuple[tuple[int, int], ...]  # the same for entries with a source


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _build_layout(spec: tuple, metas: tuple, dtype: torch.dtype) -> _Layout:
    pieces, total = pack_pieces(spec, [shape for shape, _ in metas], dtype)
    rows, entry_piece, entry_source = [], [], []
    grad_start, source_index = 0, 0

    def add(piece, numel_dims, src_strides, dst_strides, grad_strides, src_offset, piece_offset, repeat=1,
            repeat_stride=0, grad_base=0, source=-1):  # fmt: skip
        sizes = numel_dims
        numel = _numel(sizes)
        if numel == 0:
            return
        rows.append(
            (numel, *sizes[1:], *src_strides, *dst_strides, *grad_strides, src_offset, pieces[piece][0],
             piece_offset, repeat, repeat_stride, grad_base, int(source >= 0))
        )  # fmt: skip
        entry_piece.append(piece)
        entry_source.append(source)

    for piece, (kind, argument) in enumerate(_pairs(spec)):
        # The alignment gap before the next piece: zeros too, so that no element of the buffer is left unwritten.
        end = _numel(pieces[piece][1])
        following = pieces[piece + 1][0] if piece + 1 < len(pieces) else pieces[piece][0] + end
        if following > pieces[piece][0] + end:
            add(piece, (1, 1, 1, following - pieces[piece][0] - end), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0), 0, end)
        if kind == ZEROS:
            add(piece, (1, 1, 1, argument), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0), 0, 0)
            continue
        shape, stride = metas[source_index]
        grad = _contiguous_strides(shape)
        if kind == CONV:
            c_out, c_in, kh, kw = shape
            rotation = argument
            dst = (kw * c_in * c_out, c_in * c_out, c_out, 1)
            order = (2, 3, 1, 0)  # iterate (tap row, tap column, channel, output channel)
            src_strides = tuple(stride[d] for d in order)
            grad_strides = tuple(grad[d] for d in order)
            # packed channels [0, c_in - r) are source channels [r, c_in); packed [c_in - r, c_in) are [0, r)
            add(piece, (kh, kw, c_in - rotation, c_out), src_strides, dst, grad_strides, rotation * stride[1], 0,
                grad_base=grad_start + rotation * grad[1], source=source_index)  # fmt: skip
            if rotation:
                add(piece, (kh, kw, rotation, c_out), src_strides, dst, grad_strides, 0, (c_in - rotation) * c_out,
                    grad_base=grad_start, source=source_index)  # fmt: skip
        elif kind == TRANSPOSE:
            c_in, c_out = shape[0], shape[1]
            order = (0, 2, 3, 1)  # iterate (input channel, dy, dx, output channel)
            add(piece, (c_in, 2, 2, c_out), tuple(stride[d] for d in order), (4 * c_out, 2 * c_out, c_out, 1),
                tuple(grad[d] for d in order), 0, 0, grad_base=grad_start, source=source_index)  # fmt: skip
        else:  # VECTOR: the bias written `argument` times, one length apart
            (length,) = shape
            add(piece, (1, 1, 1, length), (0, 0, 0, stride[0]), (0, 0, 0, 1), (0, 0, 0, 1), 0, 0, argument, length,
                grad_base=grad_start, source=source_index)  # fmt: skip
        grad_start += _numel(shape)
        source_index += 1
    if source_index != len(metas):
        raise ValueError(f"pack: the spec takes {source_index} source tensors, got {len(metas)}")

    def blocks_of(entries) -> tuple[tuple[int, int], ...]:
        return tuple((e, first) for e in entries for first in range(0, rows[e][0], BLOCK))

    return _Layout(
        pieces=tuple(pieces),
        total=total,
        grad_total=grad_start,
        rows=tuple(rows),
        entry_piece=tuple(entry_piece),
        entry_source=tuple(entry_source),
        blocks=blocks_of(range(len(rows))),
        adjoint_blocks=blocks_of([e for e in range(len(rows)) if entry_source[e] >= 0]),
    )


_LAYOUTS = LaunchCache(256)


def _layout(spec, metas: tuple, dtype: torch.dtype) -> _Layout:
    key = (tuple(spec), metas, dtype)
    found = _LAYOUTS.get(key)
    if found is None:
        found = _build_layout(tuple(spec), metas, dtype)
        _LAYOUTS.put(key, found)
    return found


class _DeviceTables:
    """The host tables as int64 device tensors, built once per (table, device) and kept for the last few: the entry
    and block tables per layout, the source-address table per set of addresses (an optimizer step updates the
    parameters in place: same addresses, no new table)."""

    def __init__(self, maxsize: int = 32) -> None:
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.maxsize = maxsize

    def get(self, values: tuple, device: torch.device, width: int) -> torch.Tensor:
        key = (values, device, width)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        flat = [v for row in values for v in row]
        table = torch.tensor(flat, dtype=torch.int64).view(-1, width)
        if device.type != "cpu":
            table = table.to(device)
        with self._lock:
            self._entries[key] = table
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return table

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_TABLES = _DeviceTables()


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _check_sources(sources, what: str) -> tuple[torch.dtype, torch.device]:
    if not sources:
        raise ValueError(f"{what}: expected at least one source tensor, got none")
    dtype, device = sources[0].dtype, sources[0].device
    for i, t in enumerate(sources):
        check_runnable(t, f"{what} source {i}")
        if t.dtype != dtype or t.device != device:
            raise TypeError(
                f"{what}: every source must have the first one's dtype and device ({dtype} on {device}), "
                f"source {i} is {t.dtype} on {t.device}"
            )
    return dtype, device


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in SUPPORTED_DTYPES and not (INTERPRET and dtype == torch.float64):
        raise TypeError(
            f"{what}: expected float32, float16 or bfloat16 (or float64 under TRITON_INTERPRET=1), got {dtype}"
        )


def pack_weights(
    sources: list[torch.Tensor], spec: list[int], dtype: torch.dtype, *, name: str = "pack_weights", note: str = ""
) -> torch.Tensor:
    """Every piece of ``spec`` from ``sources`` (see the module docstring), cast to ``dtype``, in one flat buffer
    (one launch). Cut it with :func:`pack_pieces`. ``note``: what the launch record says about the plan's weights
    that were not packed here."""
    _check_dtype(dtype, name)
    src_dtype, device = _check_sources(sources, name)
    metas = tuple((tuple(t.shape), tuple(t.stride())) for t in sources)
    layout = _layout(spec, metas, dtype)
    out = alloc((layout.total,), dtype, device)
    if not layout.blocks:
        return out
    geometry = _TABLES.get(layout.rows, device, _FIELDS)
    blocks = _TABLES.get(layout.blocks, device, 2)
    ref = sources[0]
    addresses = tuple((sources[s].data_ptr(), 1) if s >= 0 else (ref.data_ptr(), 0) for s in layout.entry_source)
    table = _TABLES.get(addresses, device, 2)
    grid = (len(layout.blocks),)
    args = (geometry, blocks, table, ref, out)
    constexprs = {"FIELDS": _FIELDS, "BLOCK": BLOCK, "INTERPRETER": INTERPRET}
    if recording():
        read = sum(_numel(shape) for shape, _ in metas) * ref.element_size()
        reason = f"{len(sources)} tensors ({src_dtype} -> {dtype}) into one buffer"
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_pack_weights_kernel,
                grid=grid,
                flops=0,
                bytes_read=read,
                bytes_written=out.numel() * out.element_size(),
                args=args,
                constexprs=constexprs,
                launch_options={"num_warps": 4, "num_stages": 1},
                path_reason=f"{reason}; {note}" if note else reason,
            )
        )
    if not is_dry_run():
        with launch_guard(out):
            _pack_weights_kernel[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return out


def pack_weights_adjoint(
    grads: list[torch.Tensor | None],
    spec: list[int],
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    *,
    name: str = "pack_weights_backward",
) -> torch.Tensor:
    """The gradients of :func:`pack_weights`'s sources from each piece's gradient (``grads``, one per piece of
    ``spec``, in its packed shape; None: zero), in ``dtype``, one flat buffer holding each source's gradient
    contiguous in spec order (one launch)."""
    _check_dtype(dtype, name)
    pairs = _pairs(spec)
    if len(grads) != len(pairs):
        raise ValueError(f"{name}: expected one gradient per piece ({len(pairs)}), got {len(grads)}")
    present = [g for g in grads if g is not None]
    metas = tuple((tuple(shape), _contiguous_strides(shape)) for shape in shapes)
    if present:
        _, device = _check_sources(present, name)
        packed_dtype = present[0].dtype
    else:
        device, packed_dtype = None, dtype
    layout = _layout(spec, metas, packed_dtype)
    for i, (g, (_, shape)) in enumerate(zip(grads, layout.pieces, strict=True)):
        if g is not None and (tuple(g.shape) != shape or not g.is_contiguous()):
            raise ValueError(f"{name}: piece {i}'s gradient must be contiguous {shape}, got {tuple(g.shape)}")
    if device is None:
        raise ValueError(f"{name}: expected at least one piece gradient, got none")
    out = alloc((layout.grad_total,), dtype, device)
    if not layout.adjoint_blocks:
        return out
    geometry = _TABLES.get(layout.rows, device, _FIELDS)
    blocks = _TABLES.get(layout.adjoint_blocks, device, 2)
    ref = present[0]
    addresses = []
    for piece in layout.entry_piece:
        g = grads[piece]
        addresses.append((g.data_ptr(), 1) if g is not None else (ref.data_ptr(), 0))
    # New gradients every backward: a fresh table (tiny), never kept.
    table = torch.tensor(addresses, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        table = table.to(device)
    grid = (len(layout.adjoint_blocks),)
    args = (geometry, blocks, table, ref, out)
    constexprs = {"FIELDS": _FIELDS, "BLOCK": BLOCK, "INTERPRETER": INTERPRET}
    if recording():
        read = sum(g.numel() * g.element_size() for g in present)
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_pack_weights_adjoint_kernel,
                grid=grid,
                flops=0,
                bytes_read=read,
                bytes_written=out.numel() * out.element_size(),
                args=args,
                constexprs=constexprs,
                launch_options={"num_warps": 4, "num_stages": 1},
                path_reason=f"{len(present)} piece gradients ({packed_dtype}) -> {len(shapes)} sources ({dtype})",
            )
        )
    if not is_dry_run():
        with launch_guard(out):
            _pack_weights_adjoint_kernel[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return out


def clear_tables() -> None:
    """Forget the device tables (rebuilt on the next launch)."""
    _TABLES.clear()
