"""The HTML leaderboard as a person sees it: rendered by headless Chromium (Selenium, the system's
/usr/bin/chromium + chromedriver, nothing downloaded) at 1400 px, from fake run dirs with 15 and with 40
algorithms: no table wider than the page, every image loaded, one legend entry per algorithm with its
own colour, the tables' swatches the legend's, and the generated-image strips saying what they are.

``DFBENCH_UPDATE_SCREENSHOT=1`` also writes the 15-algorithm page's screenshot to docs/leaderboard.png.
"""

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from domainfusion_bench.algorithms import ALGORITHMS
from domainfusion_bench.report import write_leaderboard
from results_factory import fake_acc, make_sweep, write_fake_previews

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parents[1] / "docs"
DOMAINS = ["plain", "inverted", "sketch", "stencil"]
WIDTH = 1400

pytestmark = [
    pytest.mark.filterwarnings("ignore::domainfusion_bench.collect.CollectWarning"),
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                       reason=f"no {CHROMIUM} / {DRIVER} to render the page (Debian: apt install chromium "
                              "chromium-driver)"),
]


def algorithms(n):
    """The registered algorithms, then made-up variants and new families, ``n`` in all."""
    extra = [f"{base}-v{k}" for k in range(1, 10) for base in ("CDGA", "DomainFusion", "MyMethod", "TGDP")]
    return (ALGORITHMS.names() + extra)[:n]


# the cost columns a demo sweep records (the cost table that used to run off the page)
DEMO_COSTS = ["cost_diffusion_train_seconds", "cost_reused_diffusion_train_seconds", "cost_og_judge_seconds",
              "cost_og_samples_drawn", "cost_og_guidance_evals", "cost_og_round_classifier_train_seconds",
              "cost_og_distilled_classifier_train_seconds", "cost_reused_generated_images", "cost_reused_nfe",
              "cost_reused_generation_seconds", "cost_guidance_evals", "cost_validity_judge_train_seconds"]


def with_demo_costs(root: Path) -> None:
    for results in root.glob("*/results.jsonl"):
        recs = [json.loads(line) for line in results.read_text().splitlines()]
        spread = 1 + 4 * fake_acc(results.parent.name.split("_")[1], "cost")  # algorithms differ in cost
        for k, rec in enumerate(recs):
            rec.update({key: 1234.5 * (k + 1) for key in DEMO_COSTS})
            for key in ("wall_time", "cost_generated_images"):
                if key in rec:
                    rec[key] *= spread
        results.write_text("".join(json.dumps(r) + "\n" for r in recs))


def fake_page(root: Path, n: int) -> Path:
    make_sweep(root, {"DigitStyles": DOMAINS}, algorithms(n), n_trials=1, n_hparams=1, steps=(0, 100), pairs=False)
    with_demo_costs(root)
    write_fake_previews(root / "DigitStyles_CDGA+OG_0_h0_t0", DOMAINS, og=True)
    write_fake_previews(root / "DigitStyles_CDGA*_0_h0_t0", DOMAINS, oracle=True, seed=1)
    write_fake_previews(root / "DigitStyles_TGDP_0_h0_t0", DOMAINS, kind="pure", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_leaderboard(root, root / "board.html", costs=True)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={WIDTH},1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def open_page(driver, page: Path, width: int = WIDTH):
    driver.set_window_size(width, 1000)
    driver.get(page.resolve().as_uri())
    return driver.execute_script("return window.innerWidth")


LAYOUT = """
const w = window.innerWidth;
return {
  page: document.documentElement.scrollWidth,
  boxes: [...document.querySelectorAll('div.scroll')].map(e => e.getBoundingClientRect().right),
  images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
  legend: [...document.querySelectorAll('ol.legend li')].map(li =>
            [li.dataset.algorithm, li.querySelector('svg').getAttribute('fill')]),
  swatches: [...document.querySelectorAll('table tbody tr')].filter(r => r.querySelector('td svg')).map(r =>
            [r.cells[0].textContent.trim(), r.cells[0].querySelector('svg').getAttribute('fill')]),
  cells: [...document.querySelectorAll('table tbody td')].map(td => td.textContent),
};
"""


@pytest.mark.parametrize("n", [15, 40])
def test_page_layout_at_1400px(browser, tmp_path, n):
    page = fake_page(tmp_path, n)
    width = open_page(browser, page)
    got = browser.execute_script(LAYOUT)
    assert got["page"] <= width, "the page scrolls sideways"
    assert got["boxes"] and max(got["boxes"]) <= width, "a table is wider than the viewport"
    assert len(got["images"]) > 3 and all(got["images"]), "an image did not load"
    names = [a for a, _ in got["legend"]]
    assert sorted(names) == sorted(algorithms(n)), "one legend entry per algorithm"
    colours = [c for _, c in got["legend"]]
    assert len(set(colours)) == n, "two algorithms share a colour"
    legend = dict(got["legend"])
    assert all(legend[name] == colour for name, colour in got["swatches"]), "a table swatch is not the legend's"
    assert any("(n=1)" in c for c in got["cells"]) and not any("± 0.0" in c for c in got["cells"])
    if n == 15 and os.environ.get("DFBENCH_UPDATE_SCREENSHOT") == "1":
        screenshot(browser, DOCS / "leaderboard.png")


def test_wide_tables_scroll_inside_their_box_with_the_names_in_view(browser, tmp_path):
    """At 700 px the cost table cannot fit: it scrolls in its box, the page does not, and the algorithm
    column stays in view while it scrolls."""
    page = fake_page(tmp_path, 15)
    width = open_page(browser, page, 700)
    got = browser.execute_script("""
      const boxes = [...document.querySelectorAll('div.scroll')];
      const box = boxes.find(b => b.scrollWidth > b.clientWidth);
      if (!box) return null;
      const first = box.querySelector('tbody td');
      const before = first.getBoundingClientRect().left;
      box.scrollLeft = 300;
      return {page: document.documentElement.scrollWidth, moved: first.getBoundingClientRect().left - before,
              scrolled: box.scrollLeft};
    """)
    assert got is not None, "no table overflows at 700 px: the test page is too small to test scrolling"
    assert got["page"] <= width and got["scrolled"] > 0
    assert abs(got["moved"]) < 1, "the algorithm column scrolled out of view"


def test_generated_images_say_what_they_are(browser, tmp_path):
    page = fake_page(tmp_path, 15)
    open_page(browser, page)
    got = browser.execute_script("""
      const heads = [...document.querySelectorAll('h3.gallery-run')];
      const after = h => { const out = []; let e = h.nextElementSibling;
        while (e && !e.matches('h3, h2')) { out.push(e); e = e.nextElementSibling; } return out; };
      const run = name => after(heads.find(h => h.textContent.includes(name + ' on ')));
      const rows = els => els.filter(e => e.matches('div.scroll')).map(d =>
        [...d.querySelectorAll('tr')].map(r => r.querySelector('th').textContent));
      const invalid = [...document.querySelectorAll('img.tile.invalid')];
      return {
        og: rows(run('CDGA+OG')), oracle: run('CDGA*').map(e => e.textContent).join(' '),
        tgdp: run('TGDP').map(e => e.textContent).join(' '), tgdp_rows: rows(run('TGDP')),
        invalid: invalid.length, red: invalid.length ? getComputedStyle(invalid[0]).borderTopColor : null,
        marks: invalid.map(i => i.parentElement.textContent.trim()),
      };
    """)
    assert got["og"] and all(r == ["source", "unguided", "guided: round 1", "guided: distilled classifier"]
                             for r in got["og"]), got["og"]
    assert "ORACLE: toward a held-out domain" in got["oracle"] and "toward plain" in got["oracle"]
    assert "pure samples" in got["tgdp"] and all(r == ["generated"] for r in got["tgdp_rows"])
    assert got["invalid"] > 0 and got["red"] == "rgb(221, 0, 0)" and set(got["marks"]) == {"invalid"}


def screenshot(driver, out: Path) -> None:
    """The whole page at the current width, as one PNG."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, height)
    tmp = out.with_suffix(".tmp.png")
    driver.save_screenshot(str(tmp))
    from PIL import Image

    Image.open(tmp).convert("RGB").quantize(256).save(tmp, optimize=True)  # a third of the size, same look
    shutil.move(tmp, out)
    driver.set_window_size(WIDTH, 1000)
