"""Label placement that keeps labels apart: a greedy repel in display coordinates.

Each point's label goes to the first of a spiral of candidate spots around it (nearest first) where its
box overlaps no label placed before, no point's marker, and stays inside the axes; the plot then draws
a leader line from the label to its point when the label had to move away. Small on purpose: dozens of
points, not thousands.
"""

from __future__ import annotations

import math
from typing import Sequence

Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _box(cx: float, cy: float, w: float, h: float) -> Box:
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def candidates(x: float, y: float, w: float, h: float, rings: int = 12, per_ring: int = 16):
    """Label centres around (x, y): right, above, left, below first, then rings further out."""
    base = 0.5 * math.hypot(w, h) + 3.0
    for ring in range(rings):
        r = base * (1.0 + 0.6 * ring)
        n = 8 if ring == 0 else per_ring
        for k in range(n):
            a = math.radians(30 + 360 * k / n)
            yield x + r * math.cos(a), y + r * math.sin(a)


def place_labels(points: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                 bounds: Box | None = None, marker: float = 5.0) -> list[Box]:
    """A box for each point's label (display units, same order as ``points``) that overlaps no other
    label and no marker (a square of half-width ``marker`` around each point) where the spiral finds
    room; else the spot of least overlap."""
    markers = [_box(x, y, 2 * marker, 2 * marker) for x, y in points]
    placed: list[Box] = []
    for i, ((x, y), (w, h)) in enumerate(zip(points, sizes)):
        best, best_cost = None, math.inf
        for cx, cy in candidates(x, y, w, h):
            box = _box(cx, cy, w, h)
            outside = bounds is not None and (box[0] < bounds[0] or box[1] < bounds[1] or box[2] > bounds[2]
                                              or box[3] > bounds[3])
            cost = sum(_overlap(box, b) for b in placed) + sum(_overlap(box, m) for m in markers)
            cost += 1e6 if outside else 0.0
            if cost == 0:
                best = box
                break
            if cost < best_cost:
                best, best_cost = box, cost
        placed.append(best)
    return placed


def overlaps(boxes: Sequence[Box]) -> list[tuple[int, int]]:
    """Pairs of boxes that overlap (what a good placement leaves empty)."""
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if _overlap(boxes[i], boxes[j]) > 0]
