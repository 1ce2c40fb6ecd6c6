"""docs/adding_an_algorithm.md, done exactly as it says: its code block, its commands."""

import re
import shlex
from pathlib import Path

from domainfusion_bench import runfiles
from domainfusion_bench.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_an_algorithm.md"


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_documented_plugin_trains_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("my_algos.py").write_text(blocks("python")[0])
    commands = [shlex.split(line) for line in blocks("bash")[0].strip().splitlines()]
    assert [c[:2] for c in commands] == [["dfbench", "list"], ["dfbench", "train"]]

    main(commands[0][1:])
    assert "VREx" in capsys.readouterr().out

    # the documented command, shortened for the test
    train = commands[1][1:] + ["--steps", "11", "--checkpoint_freq", "10", "--num_workers", "0",
                               "--hparams", '{"batch_size": 8}', "--device", "cpu"]
    main(train)
    run_dir = Path("results/vrex")
    records, _ = runfiles.read_records(run_dir / runfiles.RESULTS)
    assert [r["step"] for r in records] == [0, 10]
    assert records[-1]["args"]["algorithm"] == "VREx" and "penalty" in records[-1]
    assert records[-1]["hparams"]["vrex_lambda"] == 10.0
    assert (run_dir / runfiles.DONE).exists()
