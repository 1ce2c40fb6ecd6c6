"""One run across 2 CPU processes through `accelerate launch` gives the records of a 1-process run."""

import os
import subprocess
import sys

import pytest

from domainfusion_bench import runfiles
from domainfusion_bench.training import train

ARGS = ["--dataset", "RotatedDigits", "--test_envs", "0", "--steps", "21", "--checkpoint_freq", "10",
        "--hparams", '{"batch_size": 16}', "--num_workers", "0", "--device", "cpu"]


@pytest.mark.slow
def test_accelerate_two_cpu_processes_match_one(tmp_path, tiny_train_args):
    single = train(tiny_train_args(output_dir=str(tmp_path / "single")))
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "domainfusion_bench", "train", *ARGS, "--output_dir", str(multi)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]

    a, _ = runfiles.read_records(single / runfiles.RESULTS)
    b, _ = runfiles.read_records(multi / runfiles.RESULTS)
    assert [r["step"] for r in b] == [0, 10, 20]  # one writer: no duplicated records
    assert (multi / runfiles.DONE).exists()
    for ra, rb in zip(a, b):
        # each rank sees half of every minibatch; averaged gradients equal the full-batch gradient,
        # so only float summation order differs
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3)
        for key in (k for k in ra if k.endswith("_acc")):
            assert rb[key] == pytest.approx(ra[key], abs=0.05)
