"""Shared test settings: small, CPU-only, single-threaded data loading."""

import os

import pytest
import torch

os.environ.setdefault("DFBENCH_DATA", "datasets")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_train_args(tmp_path):
    """TrainArgs for a seconds-long ERM run on the embedded RotatedDigits."""
    from domainfusion_bench.training import TrainArgs

    def make(**overrides):
        base = dict(dataset="RotatedDigits", algorithm="ERM", test_envs=[0], steps=21, checkpoint_freq=10,
                    output_dir=str(tmp_path / "run"), hparams='{"batch_size": 16}', num_workers=0, device="cpu")
        base.update(overrides)
        return TrainArgs(**base)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is fastest, and immune to a busy machine's thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
