"""One run across 2 CPU processes gives the records of a 1-process run, averaging gradients with accelerate's DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from domainfusion_bench import runfiles
from domainfusion_bench.training import train

ARGS = ["--dataset", "RotatedDigits", "--test_envs", "0", "--steps", "21", "--checkpoint_freq", "10",
        "--hparams", '{"batch_size": 16}', "--num_workers", "0", "--device", "cpu"]
# two CPU processes with torch's own launcher: `accelerate launch --cpu --num_processes 2` starts only one
# (accelerate needs mpirun for several CPU processes). The trainer's Accelerator finds the process group
# from torchrun's environment, as it does under `accelerate launch --multi_gpu`.
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_accelerate_two_cpu_processes_match_one(tmp_path, tiny_train_args):
    single = train(tiny_train_args(output_dir=str(tmp_path / "single")))
    multi = tmp_path / "multi"
    cmd = [*TWO_PROCESSES, "-m", "domainfusion_bench", "train", *ARGS, "--output_dir", str(multi)]
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


@pytest.mark.slow
def test_two_processes_average_gradients_with_ddp_buckets_not_per_parameter(tmp_path):
    out = tmp_path / "probe.json"
    cmd = [*TWO_PROCESSES, str(Path(__file__).with_name("ddp_probe.py")), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2
    for name in ("ERM", "WithSpareParts"):  # the loss goes through accelerate's DDP: no all-reduce per parameter
        r = report[name]
        assert r["ddp"] == "DistributedDataParallel" and r["trainable_params"] >= 8
        assert r["all_reduce_calls"] == 0 and r["flat_all_reduces"] == 0
        assert r["grads_equal"] and r["weights_equal"] and r["grads_are_full_batch"]
    assert report["WithSpareParts"]["spare_grad"] is False  # an unused parameter: no deadlock, no gradient
    # DDP walks the graph for unused parameters only for an algorithm that says it has some
    assert report["ERM"]["find_unused"] is False and report["WithSpareParts"]["find_unused"] is True
    assert report["seeds"] == {"rank0_kept": True, "ranks_differ": True, "masks_differ": True}
    assert report["resume"]["steps"] == [5, 5]  # rank 1 follows rank 0's reading of resume.pt
    own = report["OwnUpdate"]  # its loss bypasses DDP: one flat all-reduce for all its (small) gradients
    assert own["flat_all_reduces"] == 1 and own["all_reduce_calls"] == 1
    assert own["grads_equal"] and own["weights_equal"] and own["grads_are_full_batch"] and own["spare_grad"] is False


def _weights(run_dir):
    import torch

    state = torch.load(run_dir / runfiles.MODEL, map_location="cpu", weights_only=False)["model_dict"]
    return torch.cat([v.reshape(-1).double() for k, v in sorted(state.items()) if v.is_floating_point()])


def relative_distance(batch_size: int, tmp_path, tiny_train_args) -> tuple[float, float]:
    """||w_2proc - w_1proc|| / ||w_1proc|| after 10 steps with per-domain batch ``batch_size``, and the
    relative difference of the last record's logged loss."""
    hparams = f'{{"batch_size": {batch_size}}}'
    single = train(tiny_train_args(output_dir=str(tmp_path / f"single{batch_size}"), steps=10, checkpoint_freq=10,
                                   hparams=hparams))
    multi = tmp_path / f"multi{batch_size}"
    args = [a if a != '{"batch_size": 16}' else hparams for a in ARGS]
    args[args.index("--steps") + 1] = "10"
    cmd = [*TWO_PROCESSES, "-m", "domainfusion_bench", "train", *args, "--output_dir", str(multi)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _weights(single), _weights(multi)
    (*_, la), _ = runfiles.read_records(single / runfiles.RESULTS)
    (*_, lb), _ = runfiles.read_records(multi / runfiles.RESULTS)
    return float((a - b).norm() / a.norm()), abs(lb["loss"] / la["loss"] - 1)


@pytest.mark.slow
def test_an_odd_batch_split_4_plus_3_trains_as_one_process(tmp_path, tiny_train_args):
    # ranks hold 4 and 3 of each domain's 7 examples: each rank's loss is weighted by its share
    weights, loss = relative_distance(7, tmp_path, tiny_train_args)
    assert weights < 1e-4
    assert loss < 1e-5  # the logged loss is the global batch's mean too, not the mean of the ranks' means
