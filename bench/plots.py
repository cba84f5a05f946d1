"""PNG plots of a GPU run: fastunet's speedup per stage, and each stage placed on the roofline.

matplotlib draws them when it is importable. Otherwise a small rasterizer here does (numpy for the pixels, zlib for
the PNG encoding: axes, bars, lines, points and a 3x5 pixel font), so a run always leaves its plots behind; the
backend used is recorded. Usage::

    python bench/plots.py RESULTS.json OUTDIR      # writes OUTDIR/<config>-<dtype>-{speedup,roofline}.png
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import zlib
from collections.abc import Sequence

import numpy as np

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (170, 170, 170)
COLORS = {"torch-eager": (31, 119, 180), "torch-compile": (255, 127, 14), "roof": (200, 30, 30), "point": (44, 160, 44)}

# 3x5 glyphs: five rows of three pixels, top to bottom ("#" = ink). Lower case prints as upper case.
_GLYPHS = {
    "0": "###|#.#|#.#|#.#|###", "1": ".#.|##.|.#.|.#.|###", "2": "###|..#|###|#..|###", "3": "###|..#|.##|..#|###",
    "4": "#.#|#.#|###|..#|..#", "5": "###|#..|###|..#|###", "6": "###|#..|###|#.#|###", "7": "###|..#|.#.|.#.|.#.",
    "8": "###|#.#|###|#.#|###", "9": "###|#.#|###|..#|###", "A": ".#.|#.#|###|#.#|#.#", "B": "##.|#.#|##.|#.#|##.",
    "C": ".##|#..|#..|#..|.##", "D": "##.|#.#|#.#|#.#|##.", "E": "###|#..|##.|#..|###", "F": "###|#..|##.|#..|#..",
    "G": ".##|#..|#.#|#.#|.##", "H": "#.#|#.#|###|#.#|#.#", "I": "###|.#.|.#.|.#.|###", "J": "..#|..#|..#|#.#|.#.",
    "K": "#.#|#.#|##.|#.#|#.#", "L": "#..|#..|#..|#..|###", "M": "#.#|###|###|#.#|#.#", "N": "##.|#.#|#.#|#.#|#.#",
    "O": ".#.|#.#|#.#|#.#|.#.", "P": "##.|#.#|##.|#..|#..", "Q": ".#.|#.#|#.#|##.|.##", "R": "##.|#.#|##.|#.#|#.#",
    "S": ".##|#..|.#.|..#|##.", "T": "###|.#.|.#.|.#.|.#.", "U": "#.#|#.#|#.#|#.#|###", "V": "#.#|#.#|#.#|#.#|.#.",
    "W": "#.#|#.#|###|###|#.#", "X": "#.#|#.#|.#.|#.#|#.#", "Y": "#.#|#.#|.#.|.#.|.#.", "Z": "###|..#|.#.|#..|###",
    ".": "...|...|...|...|.#.", "-": "...|...|###|...|...", "%": "#.#|..#|.#.|#..|#.#", "/": "..#|..#|.#.|#..|#..",
    ":": "...|.#.|...|.#.|...", "(": ".#.|#..|#..|#..|.#.", ")": ".#.|..#|..#|..#|.#.", "+": "...|.#.|###|.#.|...",
    "=": "...|###|...|###|...", "_": "...|...|...|...|###", "*": "...|#.#|.#.|#.#|...", "x": "...|#.#|.#.|#.#|...",
    ">": "#..|.#.|..#|.#.|#..", "<": "..#|.#.|#..|.#.|..#", " ": "...|...|...|...|...", "?": "###|..#|.#.|...|.#.",
}  # fmt: skip


def _glyph(char: str) -> np.ndarray:
    """(5, 3) bool mask of ``char`` (``?`` for characters without a glyph)."""
    pattern = _GLYPHS.get(char) or _GLYPHS.get(char.upper()) or _GLYPHS["?"]
    return np.array([[pixel == "#" for pixel in row] for row in pattern.split("|")])


def write_png(path: str, pixels: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB array as a PNG (8-bit truecolor, no interlace, filter 0 on every row)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {pixels.shape}")
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class Canvas:
    """An RGB pixel grid with the few primitives the plots need; (0, 0) is the top-left corner."""

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = WHITE) -> None:
        self.pixels = np.empty((height, width, 3), np.uint8)
        self.pixels[:] = background
        self.width, self.height = width, height

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int]) -> None:
        """Fill the rectangle between the two corners (clipped to the canvas)."""
        xa, xb = sorted((round(x0), round(x1)))
        ya, yb = sorted((round(y0), round(y1)))
        xa, ya = max(xa, 0), max(ya, 0)
        xb, yb = min(xb, self.width - 1), min(yb, self.height - 1)
        if xa <= xb and ya <= yb:
            self.pixels[ya : yb + 1, xa : xb + 1] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int], width: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0.0, 1.0, steps + 1):
            x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
            self.rect(x - (width - 1) / 2, y - (width - 1) / 2, x + width / 2 - 0.5, y + width / 2 - 0.5, color)

    def point(self, x: float, y: float, color: tuple[int, int, int], radius: int = 3) -> None:
        for dy in range(-radius, radius + 1):
            half = int(math.sqrt(radius * radius - dy * dy))
            self.rect(x - half, y + dy, x + half, y + dy, color)

    def text(self, x: float, y: float, text: str, color: tuple[int, int, int] = BLACK, scale: int = 2) -> None:
        """Draw ``text`` with its top-left corner at (x, y), 4 * scale pixels per character."""
        for i, char in enumerate(text):
            mask = np.kron(_glyph(char), np.ones((scale, scale), bool))
            left, top = round(x) + i * 4 * scale, round(y)
            region = self.pixels[top : top + mask.shape[0], left : left + mask.shape[1]]
            region[mask[: region.shape[0], : region.shape[1]]] = color

    def save(self, path: str) -> None:
        write_png(path, self.pixels)


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def backend() -> str:
    """``matplotlib`` when it is importable, else ``builtin`` (this module's rasterizer)."""
    return "matplotlib" if _matplotlib() is not None else "builtin"


# ---------------------------------------------------------------------------------------------------------------
# Speedup per stage
# ---------------------------------------------------------------------------------------------------------------
def _speedups(stages: Sequence[dict], baseline: str) -> list[float | None]:
    key = f"speedup_vs_{baseline.replace('-', '_')}"
    return [stage.get("ratios", {}).get("fastunet", {}).get(key) for stage in stages]


def speedup_plot(stages: Sequence[dict], path: str, title: str, use: str | None = None) -> str:
    """Bars of fastunet's speedup over eager PyTorch and torch.compile for each stage; returns the backend used."""
    baselines = [b for b in ("torch-eager", "torch-compile") if any(v for v in _speedups(stages, b))]
    labels = [f"{s['index']} {s['stage']}" for s in stages]
    plt = _matplotlib() if use in (None, "matplotlib") else None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(stages)), 5))
        width = 0.8 / max(len(baselines), 1)
        for j, baseline in enumerate(baselines):
            values = [v or 0.0 for v in _speedups(stages, baseline)]
            xs = [i + (j - (len(baselines) - 1) / 2) * width for i in range(len(stages))]
            ax.bar(xs, values, width, label=f"vs {baseline}", color=[c / 255 for c in COLORS[baseline]])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(stages)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("speedup of fastunet (x, > 1: faster)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return "matplotlib"

    canvas = Canvas(max(640, 60 + 34 * len(stages)), 420)
    left, right, top, bottom = 50, canvas.width - 20, 40, 320
    values = [v for b in baselines for v in _speedups(stages, b) if v]
    y_max = max([1.5, *values]) * 1.1

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / y_max

    canvas.text(left, 8, title[: (canvas.width - left) // 8])
    for tick in np.arange(0.0, y_max, 0.5 if y_max < 4 else 1.0 if y_max < 10 else 5.0):
        canvas.line(left - 4, y_of(tick), left, y_of(tick), BLACK)
        canvas.text(4, y_of(tick) - 5, f"{tick:.1f}", scale=2)
    slot = (right - left) / max(len(stages), 1)
    bar = slot * 0.8 / max(len(baselines), 1)
    for j, baseline in enumerate(baselines):
        for i, value in enumerate(_speedups(stages, baseline)):
            if value:
                x0 = left + i * slot + slot * 0.1 + j * bar
                canvas.rect(x0, y_of(value), x0 + bar - 1, bottom, COLORS[baseline])
        canvas.rect(left + 10 + j * 200, 24, left + 18 + j * 200, 32, COLORS[baseline])
        canvas.text(left + 22 + j * 200, 24, f"vs {baseline}", scale=2)
    canvas.line(left, y_of(1.0), right, y_of(1.0), GREY)
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    for i, stage in enumerate(stages):
        canvas.text(left + i * slot + slot * 0.3, bottom + 6, str(stage["index"]), scale=2)
    for i, label in enumerate(labels):  # a legend of stage numbers under the axis
        column, row = divmod(i, 5)
        canvas.text(left + column * 130, bottom + 24 + row * 12, label[:15], scale=2)
    canvas.save(path)
    return "builtin"


# ---------------------------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------------------------
def _achieved(stages: Sequence[dict], provider: str) -> list[tuple[float, float, str]]:
    """(intensity FLOP/B, achieved TFLOP/s, label) of each stage timed for ``provider``."""
    points = []
    for stage in stages:
        entry = stage.get("providers", {}).get(provider, {})
        if entry.get("median_ms") and stage.get("fused_bytes"):
            points.append((stage["flops"] / stage["fused_bytes"], entry["tflops"], str(stage["index"])))
    return points


def roofline_plot(
    stages: Sequence[dict], peak_tflops: float, bandwidth_tbs: float, path: str, title: str, use: str | None = None
) -> str:
    """The roofline min(peak, bandwidth x intensity) on log-log axes with each stage's achieved TFLOP/s (fastunet,
    and eager PyTorch at the fused forward's intensity) placed on it; returns the backend used."""
    fast = _achieved(stages, "fastunet")
    eager = _achieved(stages, "torch-eager")
    intensities = [p[0] for p in fast + eager] or [1.0, 1000.0]
    x_lo = 10 ** math.floor(math.log10(max(min(intensities), 1e-3)) - 0.5)
    x_hi = 10 ** math.ceil(math.log10(max(intensities)) + 0.5)
    ridge = peak_tflops / bandwidth_tbs  # TFLOP/s over TB/s: FLOP per byte
    x_lo, x_hi = min(x_lo, ridge / 10), max(x_hi, ridge * 10)
    achieved = [p[1] for p in fast + eager if p[1] > 0] or [peak_tflops]
    y_lo = 10 ** math.floor(math.log10(min(min(achieved), bandwidth_tbs * x_lo)))
    y_hi = 10 ** math.ceil(math.log10(peak_tflops * 1.5))
    roof_x = np.logspace(math.log10(x_lo), math.log10(x_hi), 200)
    roof_y = np.minimum(peak_tflops, bandwidth_tbs * roof_x)
    plt = _matplotlib() if use in (None, "matplotlib") else None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 6))
        ax.loglog(roof_x, roof_y, color=[c / 255 for c in COLORS["roof"]], label="roofline")
        for points, name, color in ((fast, "fastunet", COLORS["point"]), (eager, "torch-eager", COLORS["torch-eager"])):
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], color=[c / 255 for c in color], label=name)
                for x, y, label in points:
                    ax.annotate(label, (x, y), fontsize=7)
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel("arithmetic intensity (FLOP per byte of the fused forward's compulsory traffic)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return "matplotlib"

    canvas = Canvas(720, 520)
    left, right, top, bottom = 60, 700, 40, 470

    def px(x: float) -> float:
        return left + (right - left) * (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))

    def py(y: float) -> float:
        return bottom - (bottom - top) * (math.log10(y) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))

    canvas.text(left, 8, title[: (canvas.width - left) // 8])
    for decade in range(round(math.log10(x_lo)), round(math.log10(x_hi)) + 1):
        canvas.line(px(10**decade), top, px(10**decade), bottom, (230, 230, 230))
        if px(10**decade) < right - 20:
            canvas.text(px(10**decade) - 8, bottom + 6, f"1E{decade}", scale=2)
    for decade in range(round(math.log10(y_lo)), round(math.log10(y_hi)) + 1):
        canvas.line(left, py(10**decade), right, py(10**decade), (230, 230, 230))
        canvas.text(4, py(10**decade) - 5, f"1E{decade}", scale=2)
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    for i in range(len(roof_x) - 1):
        canvas.line(px(roof_x[i]), py(roof_y[i]), px(roof_x[i + 1]), py(roof_y[i + 1]), COLORS["roof"], width=2)
    for points, color in ((eager, COLORS["torch-eager"]), (fast, COLORS["point"])):
        for x, y, label in points:
            if y > 0:
                canvas.point(px(x), py(y), color, radius=4)
                canvas.text(px(x) + 5, py(y) - 12, label, color, scale=2)
    canvas.text(left + 10, bottom + 24, "X: FLOP/BYTE  Y: TFLOP/S", scale=2)
    canvas.rect(left + 260, bottom + 24, left + 268, bottom + 32, COLORS["point"])
    canvas.text(left + 272, bottom + 24, "FASTUNET", scale=2)
    canvas.rect(left + 360, bottom + 24, left + 368, bottom + 32, COLORS["torch-eager"])
    canvas.text(left + 372, bottom + 24, "EAGER", scale=2)
    canvas.save(path)
    return "builtin"


def plot_results(payload: dict, out_dir: str, use: str | None = None) -> dict:
    """Both plots for every run of a ``run_gpu`` payload that has stage timings; returns ``{"backend", "files"}``
    (backend None when there was nothing to draw)."""
    os.makedirs(out_dir, exist_ok=True)
    files, used = [], set()
    ceilings = payload.get("ceilings", {})
    for run in payload.get("runs", []):
        stages = run.get("stages")
        if not stages:
            continue
        stem = os.path.join(out_dir, f"{run['config']}-{run['dtype']}")
        title = f"{run['config']} {run['dtype']} on {payload.get('environment', {}).get('device', '?')}"
        used.add(speedup_plot(stages, stem + "-speedup.png", f"speedup per stage: {title}", use))
        peak = ceilings.get("peak_flops", {}).get(run.get("math", "bf16"), 798e12) / 1e12
        bandwidth = ceilings.get("bandwidth_bytes_per_s", 3.0e12) / 1e12
        used.add(roofline_plot(stages, peak, bandwidth, stem + "-roofline.png", f"roofline: {title}", use))
        files += [stem + "-speedup.png", stem + "-roofline.png"]
    return {"backend": ",".join(sorted(used)) or None, "files": files}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print(__doc__.split("Usage::")[-1].strip(), file=sys.stderr)
        return 2
    results, out_dir = argv
    with open(results) as handle:
        payload = json.load(handle)
    plots = plot_results(payload, out_dir)
    payload["plots"] = plots
    with open(results, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    print(f"{len(plots['files'])} plots ({plots['backend']}) in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
