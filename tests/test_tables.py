"""Leaderboard tables: numbers worked out by hand, golden text/Markdown/LaTeX, CSV/JSON long form, HTML, CLI.

Regenerate the golden files after an intended change of the output with
``DFBENCH_UPDATE_GOLDEN=1 python -m pytest tests/test_tables.py``, and review the diff.
"""

import io
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pandas as pd
import pytest

from domainfusion_bench import cli
from domainfusion_bench.collect import records_to_frame
from domainfusion_bench.report import leaderboard, render_html, write_leaderboard
from domainfusion_bench.tables import build_leaderboard, error_bar, long_form, render, render_text
from results_factory import make_sweep, record, write_run

pytestmark = pytest.mark.filterwarnings("ignore::domainfusion_bench.collect.CollectWarning")

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("DFBENCH_UPDATE_GOLDEN") == "1"


def hand_board(records, **kwargs):
    frame, _ = records_to_frame(records)
    return build_leaderboard(frame, {"D": ["left", "right"]}, **kwargs)


def hand_records(drop_trial1_env1=False):
    """Two domains, two trials, one hparams_seed, one checkpoint each.

    left (test env 0):  trials 0.8, 0.9 -> 85.0; population std 5.0 / sqrt(2) -> +/- 3.5
    right (test env 1): trials 0.6, 0.8 -> 70.0; population std 10.0 / sqrt(2) -> +/- 7.1
    """
    recs = [
        record("D", "ERM", [0], 0, 0, 0, env0_in_acc=0.8, env0_out_acc=0.5, env1_out_acc=0.5),
        record("D", "ERM", [0], 0, 1, 0, env0_in_acc=0.9, env0_out_acc=0.5, env1_out_acc=0.5),
        record("D", "ERM", [1], 0, 0, 0, env1_in_acc=0.6, env1_out_acc=0.5, env0_out_acc=0.5),
    ]
    if not drop_trial1_env1:
        recs.append(record("D", "ERM", [1], 0, 1, 0, env1_in_acc=0.8, env1_out_acc=0.5, env0_out_acc=0.5))
    return recs


def cells(board, selection="iid", table="dataset"):
    df = long_form(board)
    return {(r.algorithm, r.column): r for r in df[(df.selection == selection) & (df.table == table)].itertuples()}


def test_error_bars_by_hand():
    # values 0.8 and 0.9: mean 0.85; population std 0.05; / sqrt(2) = 0.0354; x100 below
    assert 100 * error_bar([0.8, 0.9], "domainbed") == pytest.approx(100 * 0.05 / 2**0.5)
    # sample std (ddof 1) 0.0707 / sqrt(2) = 0.05
    assert 100 * error_bar([0.8, 0.9], "sem") == pytest.approx(5.0)
    # t_{0.975, 1} = 12.7062
    assert 100 * error_bar([0.8, 0.9], "ci95") == pytest.approx(12.7062047 * 5.0, rel=1e-6)
    assert error_bar([0.8, 0.8, 0.8, 0.8], "domainbed") == 0
    # DomainBed's bar for four values 0.8, 0.9, 0.8, 0.9: std 0.05, / sqrt(4) -> 2.5 points
    assert 100 * error_bar([0.8, 0.9, 0.8, 0.9], "domainbed") == pytest.approx(2.5)


def test_cell_values_by_hand():
    board = hand_board(hand_records(), selections=["iid"])
    c = cells(board)
    assert c[("ERM", "left")].mean == pytest.approx(85.0)
    assert c[("ERM", "left")].error == pytest.approx(5.0 / 2**0.5, abs=1e-6)
    assert c[("ERM", "right")].mean == pytest.approx(70.0)
    assert c[("ERM", "Avg")].mean == pytest.approx(77.5)  # unweighted mean of the column means
    text = render(board, "text")
    assert "85.0 +/- 3.5" in text and "70.0 +/- 7.1" in text and "77.5" in text


def test_domainbed_error_of_085_mean_is_25_with_four_trials():
    recs = [record("D", "ERM", [0], 0, t, 0, env0_in_acc=v, env1_out_acc=0.5) for t, v in enumerate([0.8, 0.9, 0.8, 0.9])]
    frame, _ = records_to_frame(recs)
    c = cells(build_leaderboard(frame, selections=["iid"]))
    assert c[("ERM", "env0")].mean == pytest.approx(85.0) and c[("ERM", "env0")].error == pytest.approx(2.5)
    assert c[("ERM", "env0")].n == 4


def test_sem_and_ci95_error_kinds():
    sem = cells(hand_board(hand_records(), selections=["iid"], error="sem"))
    assert sem[("ERM", "left")].error == pytest.approx(5.0)
    ci = cells(hand_board(hand_records(), selections=["iid"], error="ci95"))
    assert ci[("ERM", "left")].error == pytest.approx(63.531, abs=1e-3)


def test_averages_table_averages_each_trial_first():
    board = hand_board(hand_records(), selections=["iid"])
    avg = cells(board, table="averages")
    # trial 0: (80 + 60) / 2 = 70; trial 1: (90 + 80) / 2 = 85 -> 77.5 +/- std(70, 85)/sqrt(2) = 7.5/1.414
    assert avg[("ERM", "D")].mean == pytest.approx(77.5)
    assert avg[("ERM", "D")].error == pytest.approx(7.5 / 2**0.5, abs=1e-6)
    assert avg[("ERM", "Avg")].mean == pytest.approx(77.5)


def test_fewer_trials_are_shown_and_explained():
    board = hand_board(hand_records(drop_trial1_env1=True), selections=["iid"])
    c = cells(board)
    assert (c[("ERM", "right")].n, c[("ERM", "right")].expected_n) == (1, 2)
    text = render(board, "text")
    assert "60.0 +/- 0.0 (n=1)" in text
    assert "ERM / right: trial 1: no run holds out env 1" in text
    # the averages table keeps only complete trials: trial 0 -> 70.0
    avg = cells(board, table="averages")
    assert avg[("ERM", "D")].mean == pytest.approx(70.0) and avg[("ERM", "D")].n == 1
    assert "70.0 +/- 0.0 (n=1)" in text


def test_one_trial_reads_n1_for_people_and_keeps_domainbeds_zero_bar_in_text_and_latex():
    recs = [r for r in hand_records() if r["args"]["trial_seed"] == 0]  # one trial: 80 (left), 60 (right)
    board = hand_board(recs, selections=["iid"])
    md, text, tex = render(board, "markdown"), render(board, "text"), render(board, "latex")
    page = render_html(board)
    assert "| ERM | 80.0 (n=1) | 60.0 (n=1) | 70.0 (n=1) |" in md and "±" not in md.split("## ")[1]
    assert "80.0 (n=1)" in page and "± 0.0" not in page and "(n=1): one trial" in page
    assert re.search(r"^ERM\s+80\.0 \+/- 0\.0\s+60\.0 \+/- 0\.0\s+70\.0$", text, re.M) and "(n=1)" not in text
    assert "80.0 $\\pm$ 0.0" in tex and "(n=1)" not in tex
    # with more trials than this cell has, every format says so (the table's usual "(n=k)")
    short = render(hand_board(hand_records(drop_trial1_env1=True), selections=["iid"]), "markdown")
    assert "60.0 (n=1)" in short and "85.0 ± 3.5" in short


def test_missing_cell_is_X_with_reason_and_avg_is_X():
    # Another algorithm holds out env 1, so the column stays and ERM's cell there is X, with the reason.
    recs = [r for r in hand_records() if r["args"]["test_envs"] != [1]]
    recs.append(record("D", "CORAL", [1], 0, 0, 0, env1_in_acc=0.6, env1_out_acc=0.5, env0_out_acc=0.5))
    board = hand_board(recs, selections=["iid", "loo"])
    text = render(board, "text")
    iid = cells(board)
    assert pd.isna(iid[("ERM", "right")].mean) and "no run holds out env 1" in iid[("ERM", "right")].reason
    assert pd.isna(iid[("ERM", "Avg")].mean)
    assert re.search(r"^ERM\s+85\.0 \+/- 3\.5\s+X\s+X$", text, re.M)
    assert "ERM / left: trials 0-1: no pair runs (test_envs [t, v]) for this dataset" in text


def test_partial_sweep_shows_only_held_out_domains():
    # No run holds out env 1 (a quick sweep over some domains): its column is left out, said so, and
    # Avg / the averages table cover the held-out domain only.
    recs = [r for r in hand_records() if r["args"]["test_envs"] != [1]]
    board = hand_board(recs, selections=["iid"])
    text = render(board, "text")
    iid = cells(board)
    assert ("ERM", "right") not in iid
    assert iid[("ERM", "Avg")].mean == pytest.approx(85.0)
    assert cells(board, table="averages")[("ERM", "D")].mean == pytest.approx(85.0)
    assert "no run holds out right: those columns are left out, and Avg is over the 1 of 2 domains shown" in text
    assert "D: averaged over the 1 of 2 domains some run holds out" in text


def test_cost_tables():
    root_recs = [
        record("D", "ERM", [0], 0, 0, s, env0_in_acc=0.5, env1_out_acc=0.5, wall_time=10.0 * (s + 1),
               images_per_s=100.0 + s * 100, mem_gb=1.0 + s) for s in (0, 1)
    ] + [
        record("D", "Gen", [0], 0, 0, s, env0_in_acc=0.5, env1_out_acc=0.5, wall_time=40.0 * (s + 1), images_per_s=50.0,
               mem_gb=2.0, cost_generated_images=10.0 * (s + 1), cost_nfes=7.0 * (s + 1), cost_diffusion_train_seconds=3.0,
               cost_reused_generation_seconds=1.25) for s in (0, 1)
    ]
    frame, _ = records_to_frame(root_recs, run=["a", "a", "b", "b"])
    board = build_leaderboard(frame, selections=["iid"], costs=True)
    c = {(r.algorithm, r.column): r for r in long_form(board).query("table == 'costs'").itertuples()}
    assert c[("ERM", "wall time (s)")].mean == 20.0  # last record's wall_time
    assert c[("ERM", "images/s")].mean == 150.0  # mean over the run's records
    assert c[("ERM", "peak mem (GB)")].mean == 2.0  # max
    assert c[("Gen", "generated images")].mean == 20.0 and c[("Gen", "NFEs")].mean == 14.0
    assert pd.isna(c[("ERM", "generated images")].mean)
    assert c[("ERM", "runs")].mean == 1
    assert c[("Gen", "diffusion train (s)")].mean == 3.0 and c[("Gen", "reused generation (s)")].mean == 1.25
    text = render_text(board)
    assert "reused generation (s)" in text and "Gen        1     " in text  # cost columns only as wide as needed


# ---------------------------------------------------------------------------------------------------
# a whole sweep: golden outputs


def golden_sweep(root: Path) -> Path:
    """Two datasets, three algorithms, three trials, with holes a real sweep has."""
    make_sweep(root, {"Digits": ["plain", "inverted", "sketch"]}, ["ERM", "MixStyle", "Gen"], n_trials=3, n_hparams=2,
               pairs=True)
    make_sweep(root, {"Rot": ["0", "15"]}, ["ERM", "MixStyle"], n_trials=3, n_hparams=2, pairs=False)
    # ERM on Digits, sketch held out: trial 2 never ran -> (n=2)
    for hp in range(2):
        shutil.rmtree(root / f"Digits_ERM_2_h{hp}_t2")
    # MixStyle on Digits: pair [0, 2] of trial 0 missing for both hparams -> loo (n=2) for plain and sketch
    for hp in range(2):
        shutil.rmtree(root / f"Digits_MixStyle_0-2_h{hp}_t0")
    # a run still going (no done file) and a torn last line
    (root / "Rot_ERM_0_h1_t1" / "done").unlink()
    with open(root / "Rot_MixStyle_1_h0_t0" / "results.jsonl", "a") as f:
        f.write('{"args": {"dataset": "Rot", "algo')
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return golden_sweep(tmp_path_factory.mktemp("sweep"))


def board_text(root, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return leaderboard(root, fmt=fmt, costs=True)


@pytest.mark.parametrize("fmt,suffix", [("text", "txt"), ("markdown", "md"), ("latex", "tex")])
def test_golden_outputs(sweep, fmt, suffix):
    got = board_text(sweep, fmt)
    path = GOLDEN / f"leaderboard.{suffix}"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} missing: run with DFBENCH_UPDATE_GOLDEN=1 to create it"
    assert got == path.read_text(), f"{fmt} output changed; if intended, regenerate with DFBENCH_UPDATE_GOLDEN=1"


def test_golden_sweep_content(sweep):
    text = board_text(sweep, "text")
    assert text.startswith("Total records: ")
    assert "skipped lines: 1" in text and "runs not done (ignored): 1" in text
    for title in ("Dataset: Digits, model selection method: training-domain validation set",
                  "Dataset: Rot, model selection method: leave-one-domain-out cross-validation",
                  "Averages, model selection method: test-domain validation set (oracle)",
                  "Dataset: Digits, cost per run (mean over runs)"):
        assert f"-------- {title}" in text
    assert "(n=2)" in text
    assert "missing pair runs [0, 2]" in text
    assert "Gen / Rot: not run on this dataset" in text
    assert "  * every cell: trials 0-2: no pair runs (test_envs [t, v]) for this dataset" in text  # Rot, loo


def test_latex_is_booktabs_with_whole_cells(sweep):
    tex = board_text(sweep, "latex")
    assert "\\usepackage{booktabs}" in tex and tex.count("\\toprule") == tex.count("\\bottomrule") > 0
    body = [line for line in tex.splitlines() if line.endswith("\\\\") and "textbf" not in line]
    for cell in long_form(_board(sweep)).itertuples():
        if cell.table != "costs" and cell.mean is not None and not pd.isna(cell.mean):
            assert f"{cell.mean:.1f}" in tex
    for block in tex.split("\\begin{tabular}")[1:]:  # every row of a table has as many cells as its header
        rows = [line for line in block.split("\\end{tabular}")[0].splitlines() if line.endswith("\\\\")]
        assert len(rows) > 1 and len({row.count("&") for row in rows}) == 1, rows
    for line in body:
        for part in line[:-2].split("&"):
            part = part.strip()
            assert re.fullmatch(r"[A-Za-z]+|-?\d+(\.\d+)?( \$\\pm\$ \d+\.\d)?( \(n=\d+\))?|X|-", part), part


def _board(root):
    from domainfusion_bench.report import build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(root, costs=True)


def test_latex_escapes_names():
    frame, _ = records_to_frame([record("My_Data&Co", "ERM_v2", [0], 0, 0, 0, env0_in_acc=0.5, env1_out_acc=0.5),
                                 record("My_Data&Co", "ERM_v2", [1], 0, 0, 0, env1_in_acc=0.5, env0_out_acc=0.5)])
    tex = render(build_leaderboard(frame, {"My_Data&Co": ["50%", "#2"]}), "latex")
    assert "My\\_Data\\&Co" in tex and "ERM\\_v2" in tex and "50\\%" in tex and "\\#2" in tex


def test_csv_and_json_long_form(sweep):
    csv = board_text(sweep, "csv")
    df = pd.read_csv(io.StringIO(csv))
    assert list(df.columns) == ["table", "selection", "dataset", "algorithm", "column", "mean", "error", "n",
                                "expected_n", "reason"]
    row = df[(df.table == "dataset") & (df.selection == "iid") & (df.dataset == "Digits") & (df.algorithm == "ERM")
             & (df.column == "sketch")].iloc[0]
    assert (row.n, row.expected_n) == (2, 3) and "trial 2" in row.reason
    # one row per cell: 3 selections x (Digits 3 algs x 4 cols + Rot 2 x 3 + averages 3 x 3) + costs
    assert len(df[df.table != "costs"]) == 3 * (3 * 4 + 2 * 3 + 3 * 3)
    data = json.loads(board_text(sweep, "json"))
    assert isinstance(data, list) and len(data) == len(df)
    assert set(data[0]) == set(df.columns)
    first = next(d for d in data if d["table"] == "averages" and d["column"] == "Avg" and d["selection"] == "oracle")
    assert first["dataset"] is None and first["error"] is None


def test_html_is_self_contained(sweep, tmp_path):
    out = write_leaderboard(sweep, tmp_path / "board.html")
    page = out.read_text()
    # one domain plot per dataset (Digits, Rot) and the cost plot
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") == 3
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "Accuracy vs cost" in page and "Averages" in page


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no /usr/bin/chromium to render the HTML page")
def test_html_renders_in_headless_chromium(sweep, tmp_path):
    page = write_leaderboard(sweep, tmp_path / "board.html")
    png = tmp_path / "board.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", "--window-size=1280,2000", page.resolve().as_uri()],
                   check=True, timeout=120, capture_output=True)
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_html_of_a_board_without_costs():
    frame, _ = records_to_frame(hand_records())
    page = render_html(build_leaderboard(frame, selections=["oracle"]))
    assert page.count("data:image/png;base64,") == 1  # no cost columns, no cost plot


# ---------------------------------------------------------------------------------------------------
# the command line


def test_cli_collect(sweep, tmp_path, capsys):
    cli.main(["collect", str(sweep)])
    out, err = capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert out == leaderboard(sweep, fmt="text")  # defaults: all selections, DomainBed bars, no costs
    assert "skipped 1 unreadable line" in err

    cli.main(["collect", str(sweep), "--format", "markdown", "--selection", "oracle", "--error", "sem"])
    out, _ = capsys.readouterr()
    assert "## Model selection: test-domain validation set (oracle)" in out and "training-domain" not in out
    assert "standard error of the mean" in out

    cli.main(["collect", str(sweep), "--out", str(tmp_path / "lb" / "board.html"), "--format", "text"])
    assert (tmp_path / "lb" / "board.html").read_text().startswith("<!DOCTYPE html>")

    cli.main(["collect", str(sweep), "--format", "csv", "--costs", "--out", str(tmp_path / "cells.csv")])
    assert "costs" in set(pd.read_csv(tmp_path / "cells.csv")["table"])

    cli.main(["collect", str(sweep), "--include-incomplete", "--selection", "iid"])
    out, _ = capsys.readouterr()
    assert "runs not done (included): 1" in out


def test_cli_collect_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["collect", str(tmp_path / "missing")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    write_run(tmp_path / "sw", "r", [record("D", "ERM", [0], 0, 0, 0, env0_in_acc=0.5)], done=False)
    with pytest.raises(SystemExit):
        cli.main(["collect", str(tmp_path / "sw")])
    assert "--include-incomplete" in capsys.readouterr().err
