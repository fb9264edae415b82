"""Loss curves as PNG files with no plotting library.

The training command must always be able to draw its curve, and fastformers'
only runtime dependencies are torch and triton; a line chart needs little
more than a pixel buffer, a 3x5 bitmap font for the labels and zlib, so it is
drawn here rather than making matplotlib a dependency.
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Dict, List, Sequence, Tuple

Color = Tuple[int, int, int]

# 3x5 glyphs, one string per row, '#' = ink: enough for numbers and the labels used.
_FONT = {
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    ".": ["...", "...", "...", "...", ".#."], "-": ["...", "...", "###", "...", "..."],
    "/": ["..#", "..#", ".#.", "#..", "#.."], " ": ["...", "...", "...", "...", "..."],
    "a": ["...", "##.", "..#", "###", "###"], "b": ["#..", "#..", "##.", "#.#", "##."],
    "c": ["...", ".##", "#..", "#..", ".##"], "d": ["..#", "..#", ".##", "#.#", ".##"],
    "e": ["...", "###", "###", "#..", ".##"], "h": ["#..", "#..", "##.", "#.#", "#.#"],
    "i": [".#.", "...", ".#.", ".#.", ".#."], "k": ["#..", "#.#", "##.", "##.", "#.#"],
    "l": ["##.", ".#.", ".#.", ".#.", "###"], "n": ["...", "##.", "#.#", "#.#", "#.#"],
    "o": ["...", ".#.", "#.#", "#.#", ".#."], "p": ["...", "##.", "#.#", "##.", "#.."],
    "r": ["...", "#.#", "##.", "#..", "#.."], "s": ["...", ".##", ".#.", "..#", "##."],
    "t": [".#.", "###", ".#.", ".#.", ".##"], "u": ["...", "#.#", "#.#", "#.#", "###"],
    "v": ["...", "#.#", "#.#", "#.#", ".#."], "x": ["...", "#.#", ".#.", ".#.", "#.#"],
}
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (210, 210, 210)
SERIES_COLORS: List[Color] = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


class Canvas:
    """An RGB pixel buffer, origin at the top left."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i: i + 3] = bytes(color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for s in range(steps + 1):
            t = s / steps
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(width):
                for dy in range(width):
                    self.set(x + dx - width // 2, y + dy - width // 2, color)

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> None:
        """``text`` with its top-left corner at (x, y); characters without a glyph are skipped."""
        for k, char in enumerate(text.lower()):
            for row, bits in enumerate(_FONT.get(char, _FONT[" "])):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        for dx in range(scale):
                            for dy in range(scale):
                                self.set(x + (4 * k + col) * scale + dx, y + row * scale + dy, color)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        stride = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride]) for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _ticks(low: float, high: float, count: int = 5) -> List[float]:
    span = high - low
    step = 10 ** math.floor(math.log10(span / count))
    for multiple in (1, 2, 5, 10):
        if span / (step * multiple) <= count:
            step *= multiple
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.2f}".rstrip("0")


def line_chart_png(series: Dict[str, Sequence[Tuple[float, float]]], x_label: str, y_label: str,
                   width: int = 640, height: int = 400) -> bytes:
    """PNG bytes of ``series`` (name -> (x, y) points) drawn as lines on shared axes.

    Points with a NaN or infinite coordinate (a diverged or skipped training step) are left out."""
    series = {name: [(x, y) for x, y in values if math.isfinite(x) and math.isfinite(y)]
              for name, values in series.items()}
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("line_chart_png needs at least one finite point")
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    if x_high == x_low:
        x_high = x_low + 1
    if y_high == y_low:
        y_high = y_low + 1
    margin = (y_high - y_low) * 0.05
    y_low, y_high = y_low - margin, y_high + margin
    left, right, top, bottom = 70, width - 20, 40, height - 50
    canvas = Canvas(width, height)

    def to_px(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    for y in _ticks(y_low, y_high):
        _, py = to_px(x_low, y)
        canvas.line(left, py, right, py, GREY)
        canvas.text(4, int(py) - 5, _label(y))
    for x in _ticks(x_low, x_high):
        px, _ = to_px(x, y_low)
        canvas.line(px, bottom, px, bottom + 4, BLACK)
        canvas.text(int(px) - 8, bottom + 10, _label(x))
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    canvas.text((left + right) // 2 - 4 * len(x_label), height - 18, x_label)
    canvas.text(left, 10, y_label)
    for k, (name, values) in enumerate(series.items()):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        pixels = [to_px(x, y) for x, y in values]
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
            canvas.line(x0, y0, x1, y1, color, width=2)
        if len(pixels) == 1:
            canvas.line(*pixels[0], *pixels[0], color, width=4)
        legend_x = right - 120
        canvas.line(legend_x, 16 + 14 * k, legend_x + 20, 16 + 14 * k, color, width=2)
        canvas.text(legend_x + 26, 11 + 14 * k, name)
    return canvas.png()
