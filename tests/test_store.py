"""The cached-model store: one model per identity, trained once, saved as tensors + JSON, reused with its
cost reported as reused, refused by the leakage guard when it saw a held-out domain."""

import json

import pytest
import torch

from domainfusion_bench.costs import CostMeter
from domainfusion_bench.diffusion.conditions import LeakageGuard
from domainfusion_bench.diffusion.store import META, WEIGHTS, ModelStore
from domainfusion_bench.errors import DfbenchError


class Data:
    name, domains = "Toy", ["a", "b", "c"]

    def sizes(self):
        return [10, 10, 10]


def get(store, calls, train_envs=(0, 1), config=None, **kw):
    def fit(module):
        calls.append(1)
        with torch.no_grad():
            module.weight.fill_(3.0)
        return {"accuracy": 0.9}

    return store.get_or_train("probe", dataset=Data(), train_envs=train_envs, trial_seed=0, holdout_fraction=0.2,
                              config=config or {"width": 4}, build=lambda: torch.nn.Linear(4, 2), train=fit, **kw)


def test_trains_once_saves_tensors_and_reports_reuse(tmp_path):
    store, calls = ModelStore(tmp_path), []
    first_costs, second_costs = CostMeter(), CostMeter()
    first = get(store, calls, costs=first_costs, made_by="run-a")
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    second = get(store, calls, costs=second_costs, made_by="run-b")
    assert torch.equal(torch.rand(1), expected)  # loading did not move the caller's random stream
    assert calls == [1] and not first.reused and second.reused and first.path == second.path
    assert torch.equal(second.module.weight, torch.full((2, 4), 3.0)) and not second.module.weight.requires_grad
    assert second.info == {"accuracy": 0.9} and sorted(p.name for p in first.path.iterdir()) == [META, WEIGHTS]
    assert "probe_train_seconds" in first_costs.totals and "reused_probe_train_seconds" not in first_costs.totals
    assert second_costs.totals["reused_probe_train_seconds"] == second_costs.totals["probe_train_seconds"]
    meta = json.loads((first.path / META).read_text())
    assert meta["made_by"] == "run-a" and meta["identity"]["seen_envs"] == [0, 1]
    # another config or other training domains are other models
    assert get(store, calls, config={"width": 5}).path != first.path and get(store, calls, (0, 2)).path != first.path
    assert len(calls) == 3


def test_the_guard_refuses_a_model_that_saw_a_held_out_domain(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(DfbenchError, match="held-out domain 'b'"):
        get(store, [], guard=LeakageGuard("Toy", Data.domains, held_out=[1]))
    get(store, [], train_envs=(0, 2))
    with pytest.raises(DfbenchError, match="held-out domain 'c'"):
        get(store, [], train_envs=(0, 2), guard=LeakageGuard("Toy", Data.domains, held_out=[2]))


def test_an_interrupted_save_is_retrained(tmp_path):
    store, calls = ModelStore(tmp_path), []
    entry = get(store, calls)
    (entry.path / META).unlink()  # as if killed between writing weights and meta
    get(store, calls)
    assert len(calls) == 2


def test_training_elsewhere_sees_a_model_lock_held_by_another_process(tmp_path):
    import subprocess
    import sys
    import time

    store = ModelStore(tmp_path)
    assert not store.training_elsewhere("pixel_ddpm")  # nothing there
    lock = tmp_path / "pixel_ddpm" / "abc.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"from filelock import FileLock; import time\n"
                               f"with FileLock({str(lock)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert store.training_elsewhere("pixel_ddpm") and not store.training_elsewhere("validity_judge")
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while store.training_elsewhere("pixel_ddpm") and time.time() < deadline:
        time.sleep(0.1)
    assert not store.training_elsewhere("pixel_ddpm")  # released with its process
