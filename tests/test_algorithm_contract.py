"""Every registered algorithm (new ones included automatically) honours the API: it builds, trains a few
steps, predicts, writes records, and a run killed after a checkpoint resumes into exactly the records an
uninterrupted run writes. Cheap settings come from each class's ``SMOKE_HPARAMS``."""

import json

import pytest
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms import ALGORITHMS
from domainfusion_bench.training import TrainArgs, train

BASE = {"batch_size": 8, "cnn_width": 16}
# what differs between two identical runs: time, memory, and who paid for cached work
VOLATILE = ("step_time", "data_time", "images_per_s", "mem_gb", "wall_time", "args")


def comparable(record):
    return {k: v for k, v in record.items()
            if k not in VOLATILE and not (k.startswith("cost_") and ("seconds" in k or "reused" in k))}


def read(run_dir):
    return [json.loads(line) for line in (run_dir / runfiles.RESULTS).read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("contract-data")  # shared: generative methods share one cached DDPM


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_trains_predicts_and_resumes_identically(name, data_dir, tmp_path, monkeypatch):
    cls = ALGORITHMS.get(name)
    hparams = json.dumps({**BASE, **cls.SMOKE_HPARAMS})
    common = dict(algorithm=name, dataset="DigitStyles", test_envs=[0], steps=5, checkpoint_freq=2,
                  data_dir=str(data_dir), hparams=hparams, num_workers=0, device="cpu")
    straight = tmp_path / "straight"
    train(TrainArgs(output_dir=str(straight), **common))

    real_heartbeat = runfiles.heartbeat

    def killed_after_first_checkpoint(run_dir):
        real_heartbeat(run_dir)
        if (run_dir / runfiles.RESUME).exists():
            raise KeyboardInterrupt("killed")

    killed = tmp_path / "killed"
    monkeypatch.setattr(runfiles, "heartbeat", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(TrainArgs(output_dir=str(killed), **common))
    monkeypatch.setattr(runfiles, "heartbeat", real_heartbeat)
    assert [r["step"] for r in read(killed)] == [0] and not (killed / runfiles.DONE).exists()
    train(TrainArgs(output_dir=str(killed), **common))

    records = read(straight)
    assert [r["step"] for r in records] == [0, 2, 4] and (straight / runfiles.DONE).exists()
    assert [comparable(r) for r in read(killed)] == [comparable(r) for r in records]
    assert all(0 <= r["env0_in_acc"] <= 1 and r["loss"] == r["loss"] for r in records)

    saved = torch.load(straight / runfiles.MODEL, weights_only=False)
    model = cls(saved["model_input_shape"], saved["model_num_classes"], saved["model_num_domains"], saved["model_hparams"])
    model.load_state_dict(saved["model_dict"])
    model.eval()
    logits = model.predict(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
