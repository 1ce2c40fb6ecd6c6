"""One look per leaderboard row, shared by every plot and table of the page: a hue per algorithm family,
a marker and a shade per variant inside it.

The family comes from the algorithm classes, not from a list of names: it is the most basic class of the
algorithm's lineage below the framework's shared bases (``Algorithm``, ``ERM``, ``GenerativeAlgorithm``),
so ``CDGA+OG`` and ``CDGA*`` are CDGA variants, ``MixStyle`` and ``EFDM`` share ``StyleMixingAlgorithm``,
and a user's ``MyCDGA(CDGA)`` lands in CDGA's family. A class may name its family with a ``FAMILY``
attribute. Rows that name no registered algorithm (DomainBed runs, labels such as ``CDGA* [oracle]``
are first stripped of their ``[...]`` tag) join the family of the longest registered name they start
with, else the family of their stem (``MyMethod-v2``: ``MyMethod``).
"""

from __future__ import annotations

import colorsys
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from matplotlib import colors as mcolors

# matplotlib marker -> how the html legend draws it (sides of a regular polygon and its rotation, 0 = circle)
MARKERS = [("o", 0, 0), ("s", 4, 45), ("^", 3, 90), ("D", 4, 0), ("v", 3, -90), ("p", 5, 90), ("h", 6, 0),
           ("<", 3, 180), (">", 3, 0), ("8", 8, 22.5)]
# matplotlib's tab10 (its grey last: grey reads as "missing"); further families get golden-angle hues
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#7f7f7f"]


@dataclass(frozen=True)
class Style:
    number: int  # 1-based, the row's number in the page legend and on the cost plots
    name: str
    family: str
    color: str  # "#rrggbb"
    marker: str  # matplotlib marker
    variant: int  # 0 = the family's root algorithm (or its first row)


def _tag_free(name: str) -> str:
    return re.sub(r"\s*\[[^\]]*\]\s*$", "", name)


def family_of_class(cls: type) -> str:
    """The family of an algorithm class (see the module docstring)."""
    explicit = getattr(cls, "FAMILY", None)
    if explicit:
        return str(explicit)
    from domainfusion_bench.algorithms.base import Algorithm
    from domainfusion_bench.algorithms.erm import ERM
    from domainfusion_bench.algorithms.generative import GenerativeAlgorithm

    shared = {Algorithm, GenerativeAlgorithm} | ({ERM} if cls is not ERM else set())
    lineage = [c for c in cls.__mro__ if isinstance(c, type) and issubclass(c, Algorithm) and c not in shared]
    root = lineage[-1] if lineage else cls
    if "registered_name" in vars(root):
        return root.registered_name
    return re.sub(r"(Algorithm|Base)$", "", root.__name__) or root.__name__


def family_of(name: str) -> str:
    """The family of a leaderboard row name."""
    from domainfusion_bench.algorithms import ALGORITHMS

    bare = _tag_free(name)
    if bare in ALGORITHMS:
        return family_of_class(ALGORITHMS.get(bare))
    prefixes = [n for n in ALGORITHMS.names() if bare.startswith(n) and n != bare]
    if prefixes:
        return family_of_class(ALGORITHMS.get(max(prefixes, key=len)))
    return re.split(r"[-+*_ ]", bare, maxsplit=1)[0] or bare  # "MyMethod-v2" -> MyMethod


def _depth(name: str) -> int:
    """How far below its family root a registered algorithm sits (roots first in a family)."""
    from domainfusion_bench.algorithms import ALGORITHMS

    bare = _tag_free(name)
    if bare not in ALGORITHMS:
        return 99
    return len(ALGORITHMS.get(bare).__mro__)


def family_hues(n: int) -> list[str]:
    """``n`` distinct base colours: the palette, then hues spaced by the golden angle."""
    out = list(PALETTE[:n])
    for k in range(len(out), n):
        h = (0.11 + k * 0.618034) % 1.0
        r, g, b = colorsys.hls_to_rgb(h, 0.45, 0.75)
        out.append(mcolors.to_hex((r, g, b)))
    return out


def shade(color: str, variant: int, n_variants: int) -> str:
    """The family colour for variant 0; the others the same hue at lightnesses a whole step apart from it
    and from each other (nearest first, darker then lighter), inside [0.2, 0.8] so they stay visible."""
    if variant == 0 or n_variants < 2:
        return mcolors.to_hex(color)
    h, l, s = colorsys.rgb_to_hls(*mcolors.to_rgb(color))
    lo, hi = 0.2, 0.8
    base = min(max(l, lo), hi)
    step = min(0.12, (hi - lo) / n_variants)
    while True:  # ends: a smaller step fits more levels on both sides of base
        ks = [k for k in range(-n_variants, n_variants + 1) if k and lo <= base + k * step <= hi]
        if len(ks) >= n_variants - 1:
            break
        step *= 0.9
    ks.sort(key=lambda k: (abs(k), k))
    return mcolors.to_hex(colorsys.hls_to_rgb(h, base + ks[variant - 1] * step, s))


def styles_for(names: Iterable[str]) -> dict[str, Style]:
    """The style of every row name, in the order given (numbers follow it); the same names give the same styles."""
    names = list(dict.fromkeys(names))
    families = list(dict.fromkeys(family_of(n) for n in names))
    hues = dict(zip(families, family_hues(len(families))))
    members: dict[str, list[str]] = {f: [] for f in families}
    for n in names:
        members[family_of(n)].append(n)
    out: dict[str, Style] = {}
    for fam, rows in members.items():
        rows = sorted(rows, key=lambda r: (_depth(r), names.index(r)))
        for v, r in enumerate(rows):
            out[r] = Style(names.index(r) + 1, r, fam, shade(hues[fam], v, len(rows)), MARKERS[v % len(MARKERS)][0], v)
    # shades of different families can meet at the extremes: nudge a repeat until every colour is unique
    seen: set[str] = set()
    for r in names:
        st = out[r]
        color, k = st.color, 0
        while color in seen:  # a finer shade, then a hue a step off: always ends
            k += 1
            h, l, sat = colorsys.rgb_to_hls(*mcolors.to_rgb(shade(st.color, 1 + k % (2 + k), 3 + k)))
            color = mcolors.to_hex(colorsys.hls_to_rgb((h + 0.004 * (k // 8)) % 1.0, l, sat))
        seen.add(color)
        if color != st.color:
            out[r] = Style(st.number, st.name, st.family, color, st.marker, st.variant)
    return {r: out[r] for r in names}


def marker_svg(style: Style, size: int = 14) -> str:
    """An inline SVG of the row's marker in its colour (the html legend and the table swatches)."""
    sides, rot = next((s, r) for m, s, r in MARKERS if m == style.marker)
    c, rad = size / 2, size / 2 - 1.5
    if sides == 0:
        shape = f'<circle cx="{c}" cy="{c}" r="{rad:.1f}"/>'
    else:
        pts = " ".join(f"{c + rad * math.cos(math.radians(rot + 360 * k / sides)):.1f},"
                       f"{c - rad * math.sin(math.radians(rot + 360 * k / sides)):.1f}" for k in range(sides))
        shape = f'<polygon points="{pts}"/>'
    return (f'<svg class="swatch" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
            f'data-color="{style.color}" fill="{style.color}" stroke="#333" stroke-width="0.8">{shape}</svg>')


def ordered(styles: dict[str, Style], names: Sequence[str]) -> list[Style]:
    return [styles[n] for n in names if n in styles]
