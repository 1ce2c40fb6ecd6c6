"""The layer-v2 hooks of the trainer: an algorithm may swap its training splits mid-run (``on_step``),
keep extra state in the resume point (``extra_state`` / ``load_extra_state``) and put its own
measurements into the records (``context.metrics``); a killed run resumes identically."""

import json

import pytest
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms import ALGORITHMS
from domainfusion_bench.algorithms.erm import ERM
from domainfusion_bench.data import get_dataset
from domainfusion_bench.data.pools import mixed_split
from domainfusion_bench.training import TrainArgs, train


class SwapAtStep3(ERM):
    """At step 3 draws a random uint8 pool (global RNG) and trains on real + pool from then on."""

    def prepare(self, context):
        self.pool = torch.zeros(0, dtype=torch.uint8)

    def splits(self, context):
        labels = torch.zeros(len(self.pool), dtype=torch.long)
        return [mixed_split(s, self.pool, labels, 0.5) for s in context.train_splits]

    def on_step(self, step, context):
        if step == 3:
            self.pool = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
            context.metrics.set("pool_size", len(self.pool))
            return self.splits(context)
        return None

    def extra_state(self):
        return {"pool": self.pool}

    def load_extra_state(self, state, context):
        self.pool = state["pool"]
        return self.splits(context) if len(self.pool) else None


def read(run_dir):
    return [json.loads(line) for line in (run_dir / runfiles.RESULTS).read_text().splitlines()]


def strip(records):
    return [{k: v for k, v in r.items() if k not in ("step_time", "data_time", "images_per_s", "mem_gb", "wall_time", "args")}
            for r in records]


def test_swapped_splits_metrics_and_extra_state_survive_a_kill(tmp_path, monkeypatch):
    monkeypatch.setitem(ALGORITHMS._entries, "SwapAtStep3", SwapAtStep3)
    SwapAtStep3.registered_name = "SwapAtStep3"
    common = dict(algorithm="SwapAtStep3", dataset="DigitStyles", test_envs=[0], steps=7, checkpoint_freq=2,
                  data_dir=str(tmp_path), hparams='{"batch_size": 8, "cnn_width": 16}', num_workers=0,
                  device="cpu", skip_model_save=True)
    straight = tmp_path / "straight"
    train(TrainArgs(output_dir=str(straight), **common))
    records = read(straight)
    assert "metric_pool_size" not in records[1] and [r["metric_pool_size"] for r in records[2:]] == [6, 6]

    real_heartbeat = runfiles.heartbeat

    def killed_at_step_4(run_dir):
        real_heartbeat(run_dir)
        if len(read(run_dir)) == 3:
            raise KeyboardInterrupt("killed")

    killed = tmp_path / "killed"
    monkeypatch.setattr(runfiles, "heartbeat", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(TrainArgs(output_dir=str(killed), **common))
    monkeypatch.setattr(runfiles, "heartbeat", real_heartbeat)
    train(TrainArgs(output_dir=str(killed), **common))
    assert strip(read(killed)) == strip(records)

    # the pool changed what was trained on: without the swap the losses differ from step 4 on
    plain = tmp_path / "plain"
    train(TrainArgs(output_dir=str(plain), **{**common, "algorithm": "ERM"}))
    assert read(plain)[1]["loss"] == records[1]["loss"] and read(plain)[3]["loss"] != records[3]["loss"]


@pytest.mark.parametrize("name", ["DigitStyles", "synthetic-pacs"])
def test_unit_conversions_round_trip_model_inputs(name, tmp_path):
    from domainfusion_bench.data import synthetic

    synthetic.generate(tmp_path / synthetic.SyntheticPACS.SUBDIR, per_class=1)
    dataset = get_dataset(name, tmp_path)
    x01 = torch.rand(2, *dataset.input_shape)
    model_input = dataset.from_unit(x01)
    assert torch.allclose(dataset.to_unit(model_input), x01, atol=1e-6)
    raw, _ = dataset.envs[0][0]
    unit = dataset.item_to_unit(raw)
    assert unit.dtype == torch.float32 and 0 <= unit.min() and unit.max() <= 1 and unit.shape[0] == dataset.input_shape[0]
    if dataset.NORMALIZATION is not None:  # a normalised model input maps back to the plain [0, 1] image
        from torchvision import transforms as T

        plain = T.Compose([T.Resize((dataset.resolution, dataset.resolution)), T.ToTensor()])(raw)
        assert torch.allclose(dataset.to_unit(dataset.eval_transform()(raw).unsqueeze(0))[0], plain, atol=1e-5)
