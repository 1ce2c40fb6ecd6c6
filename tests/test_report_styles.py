"""The page's look: algorithm families from the classes, one distinct style per row, labels placed apart."""

import colorsys

import pytest
from matplotlib import colors as mcolors

from domainfusion_bench.algorithms import ALGORITHMS, register_algorithm
from domainfusion_bench.algorithms.cdga import CDGA
from domainfusion_bench.algorithms.erm import ERM
from domainfusion_bench.report.labels import overlaps, place_labels
from domainfusion_bench.report.styles import family_of, styles_for


def test_families_come_from_the_algorithm_classes():
    assert {family_of(n) for n in ("CDGA", "CDGA*", "CDGA+OG", "CDGA* [oracle]")} == {"CDGA"}
    assert {family_of(n) for n in ("TGDP", "TGDP+OG", "TGDP-FS [few-shot target]")} == {"TGDP"}
    assert {family_of(n) for n in ("DomainFusion", "DomainFusion+OG", "DomainFusion-LD", "DomainFusion-Aug")} == \
        {"DomainFusion"}
    assert family_of("DiTi-finetune") == family_of("DiTi") == "DiTi"
    assert family_of("MixStyle") == family_of("EFDM") != family_of("ERM") == "ERM"
    # not registered: the longest registered prefix, else the stem
    assert family_of("CDGA-ablation") == "CDGA" and family_of("MyMethod-v2") == family_of("MyMethod") == "MyMethod"


@pytest.fixture
def user_algorithms():
    added = []

    def add(name, cls):
        register_algorithm(name)(cls)
        added.append(name)
        return cls

    yield add
    for name in added:
        ALGORITHMS._entries.pop(name, None)


def test_a_users_new_algorithm_gets_a_family_and_its_own_style(user_algorithms):
    user_algorithms("FancyCDGA", type("FancyCDGA", (CDGA,), {}))
    user_algorithms("Brandnew", type("Brandnew", (ERM,), {}))
    user_algorithms("Tagged", type("Tagged", (ERM,), {"FAMILY": "CDGA"}))
    assert family_of("FancyCDGA") == "CDGA" and family_of("Brandnew") == "Brandnew" and family_of("Tagged") == "CDGA"
    st = styles_for(["ERM", "CDGA", "FancyCDGA", "Brandnew"])
    assert st["FancyCDGA"].family == "CDGA" and st["FancyCDGA"].marker != st["CDGA"].marker
    assert len({s.color for s in st.values()}) == 4


def _hue(color):
    return colorsys.rgb_to_hls(*mcolors.to_rgb(color))[0]


@pytest.mark.parametrize("extra", [0, 25])
def test_every_row_has_its_own_colour_and_a_family_keeps_its_hue(extra):
    names = ALGORITHMS.names() + [f"{b}-v{k}" for k in range(1, 10) for b in ("CDGA", "TGDP", "Other")][:extra]
    st = styles_for(names)
    assert len({s.color for s in st.values()}) == len(names)
    assert [s.number for s in st.values()] == list(range(1, len(names) + 1))
    for fam in {s.family for s in st.values()}:
        members = [s for s in st.values() if s.family == fam]
        hues = [_hue(s.color) for s in members]
        assert all(min(abs(a - hues[0]), 1 - abs(a - hues[0])) < 0.03 for a in hues), (fam, [s.color for s in members])
        assert len({s.marker for s in members}) == min(len(members), 10), fam  # a marker per variant
        rgb = [mcolors.to_rgb(s.color) for s in members]  # shades a reader can tell apart, not 1-bit nudges
        assert all(sum((a - b) ** 2 for a, b in zip(p, q)) ** 0.5 > 0.05 for i, p in enumerate(rgb) for q in rgb[:i])
    roots = [s.color for s in st.values() if s.variant == 0]
    assert len(set(roots)) == len(roots)  # families differ in hue
    assert styles_for(names) == st  # the same rows give the same styles in every plot and table


def test_labels_of_clustered_points_do_not_collide():
    # 40 points, 30 of them inside a 40 x 40 px patch, with 14 x 10 px labels (as the cost plot draws them)
    pts = [(300 + (k * 7) % 40, 200 + (k * 13) % 40) for k in range(30)] + [(100 + 20 * k, 80) for k in range(10)]
    sizes = [(14.0, 10.0)] * len(pts)
    bounds = (0.0, 0.0, 800.0, 500.0)
    boxes = place_labels(pts, sizes, bounds, marker=5)
    assert overlaps(boxes) == []
    for (x, y), b in zip(pts, boxes):
        assert bounds[0] <= b[0] and b[2] <= bounds[2] and bounds[1] <= b[1] and b[3] <= bounds[3]
    for x, y in pts:  # no label on a marker
        assert not any(b[0] < x + 5 and x - 5 < b[2] and b[1] < y + 5 and y - 5 < b[3] for b in boxes)
    # a lone point's label sits right next to it
    (b,) = place_labels([(50, 50)], [(14, 10)], bounds)
    assert abs((b[0] + b[2]) / 2 - 50) < 20 and abs((b[1] + b[3]) / 2 - 50) < 20
