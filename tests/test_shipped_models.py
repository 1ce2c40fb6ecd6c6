"""Models shipped with the package: found by the same key as a trained one, refused by the leakage guard
when their model card lists a held-out domain as seen, and refused with one clear error when a file's
checksum does not match the card."""

import json

import pytest
import torch

from domainfusion_bench.costs import CostMeter
from domainfusion_bench.diffusion.conditions import LeakageGuard
from domainfusion_bench.diffusion.store import CARD, SHIPPED_DIR, WEIGHTS, ModelStore, write_shipped
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import split_indices


class Data:
    name, domains = "Toy", ["a", "b", "c"]

    def sizes(self):
        return [10, 10, 10]


def get(store, calls, **kw):
    def fit(module):
        calls.append(1)
        with torch.no_grad():
            module.weight.fill_(3.0)
        return {"accuracy": 0.9}

    return store.get_or_train("probe", dataset=Data(), train_envs=(0, 1), trial_seed=0, holdout_fraction=0.2,
                              config={"width": 4}, build=lambda: torch.nn.Linear(4, 2), train=fit, **kw)


@pytest.fixture
def shipped(tmp_path):
    """A model trained in one store and shipped (as float16) into a package-like folder."""
    maker, calls = ModelStore(tmp_path / "maker", shipped=None), []
    made = get(maker, calls, made_by="maker")
    dest = write_shipped(made.path, tmp_path / "package", kind="probe", key=made.key, identity=made.meta["identity"],
                         dataset=Data(), seen_envs=[0, 1], train_seconds=made.train_seconds,
                         command="dfbench probe train", info=made.info, card_text="# probe\n", half=True)
    return made, dest, tmp_path / "package"


def test_store_finds_the_shipped_model_by_its_key(shipped, tmp_path):
    made, dest, package = shipped
    store, calls, costs = ModelStore(tmp_path / "user", shipped=package), [], CostMeter()
    entry = get(store, calls, costs=costs, made_by="user-run", guard=LeakageGuard("Toy", Data.domains, [2]))
    assert calls == [] and entry.key == made.key and entry.path == dest and entry.reused
    assert entry.module.weight.dtype == torch.float32 and torch.all(entry.module.weight == 3.0)
    assert entry.info == {"accuracy": 0.9}
    assert costs.totals["reused_probe_train_seconds"] == pytest.approx(made.train_seconds)
    assert not (tmp_path / "user" / "probe").exists() or not any((tmp_path / "user" / "probe").glob("*/meta.json"))
    card = json.loads((dest / CARD).read_text())
    assert card["seen_domains"] == ["a", "b"] and set(card["files"]) == {WEIGHTS}
    assert (dest / "MODEL_CARD.md").read_text() == "# probe\n"


def test_another_config_is_not_served_by_the_shipped_model(shipped, tmp_path):
    _, _, package = shipped
    store, calls = ModelStore(tmp_path / "user", shipped=package), []
    store.get_or_train("probe", dataset=Data(), train_envs=(0, 1), trial_seed=0, holdout_fraction=0.2,
                       config={"width": 5}, build=lambda: torch.nn.Linear(4, 2), train=lambda m: calls.append(1))
    assert calls == [1]


def test_guard_refuses_a_shipped_model_whose_card_lists_the_held_out_domain(shipped, tmp_path):
    _, dest, package = shipped
    card = json.loads((dest / CARD).read_text())
    card["seen_domains"] = ["a", "b", "c"]  # the card says it saw c, whatever its key claims
    (dest / CARD).write_text(json.dumps(card))
    store, calls = ModelStore(tmp_path / "user", shipped=package), []
    with pytest.raises(DfbenchError, match=r"leakage guard.*model card lists a, b, c as seen.*held-out domain 'c'"):
        get(store, calls, guard=LeakageGuard("Toy", Data.domains, [2]))
    assert calls == []
    # the run that holds out nothing the card lists may use it
    assert get(store, calls, guard=LeakageGuard("Toy", Data.domains, [])).module is not None


def test_checksum_mismatch_is_one_clear_error(shipped, tmp_path):
    _, dest, package = shipped
    (dest / WEIGHTS).write_bytes((dest / WEIGHTS).read_bytes()[:-1] + b"\x00")
    store, calls = ModelStore(tmp_path / "user", shipped=package), []
    with pytest.raises(DfbenchError, match=r"checksum mismatch for weights\.safetensors.*reinstall dfbench.*dfbench probe train"):
        get(store, calls)
    assert calls == []


def test_card_without_seen_domains_is_refused(shipped, tmp_path):
    _, dest, package = shipped
    card = json.loads((dest / CARD).read_text())
    del card["seen_domains"]
    (dest / CARD).write_text(json.dumps(card))
    with pytest.raises(DfbenchError, match="lists no seen_domains"):
        get(ModelStore(tmp_path / "user", shipped=package), [])


def test_default_store_looks_in_the_package():
    assert ModelStore("unused").shipped == SHIPPED_DIR


# ------------------------------------------------------------------------------------------------
# The models the package ships: DigitStyles with stencil held out (the demo)
# ------------------------------------------------------------------------------------------------

def _digitstyles():
    from domainfusion_bench.data import get_dataset

    return get_dataset("DigitStyles", "datasets")


def test_demo_pixel_ddpm_is_shipped_under_the_key_runs_ask_for(tmp_path):
    from domainfusion_bench.diffusion.trainer import ddpm_where, default_config, train_pixel_ddpm

    ds, store = _digitstyles(), ModelStore(tmp_path, shipped=SHIPPED_DIR)
    config = default_config(ds)  # what CDGA and `dfbench diffusion train` use
    key = store.key_of(store.identity("pixel_ddpm", **ddpm_where(ds, [0, 1, 3], 0, 0.2, config)))
    assert store.shipped_path("pixel_ddpm", key) is not None, "the shipped DDPM's key is not default_config's"
    costs = CostMeter()
    trained = train_pixel_ddpm(ds, [0, 1, 3], [2], trial_seed=1, store=store, costs=costs, progress=False)
    assert trained.reused and trained.key == key and trained.path.is_relative_to(SHIPPED_DIR)
    assert next(trained.backbone.model.parameters()).dtype == torch.float32
    assert costs.totals["reused_diffusion_train_seconds"] == costs.totals["diffusion_train_seconds"] > 0
    assert not any(tmp_path.rglob("meta.json"))  # used in place, nothing written to the user's store
    # a run holding out another domain asks for another key (other training domains): never this model
    with pytest.raises(DfbenchError, match="leakage guard"):
        train_pixel_ddpm(ds, [0, 1, 3], [1], store=store, progress=False)


def test_demo_judge_is_shipped_under_the_key_runs_ask_for(tmp_path):
    from types import SimpleNamespace

    from domainfusion_bench.algorithms.validity import validity_judge, judge_hparams
    from domainfusion_bench.hparams import HParamSpace

    space = HParamSpace()
    judge_hparams(space)
    ds = _digitstyles()
    store = ModelStore(tmp_path, shipped=SHIPPED_DIR)
    calls = []
    store_get = store.get_or_train

    def no_training(*args, train, **kw):
        return store_get(*args, train=lambda m: calls.append(1), **kw)

    store.get_or_train = no_training
    context = SimpleNamespace(dataset=ds, train_envs=[0, 1, 3], args=SimpleNamespace(trial_seed=2, holdout_fraction=0.2),
                              models=store, costs=CostMeter(), made_by="test", device="cpu", heartbeat=lambda: None)
    entry = validity_judge(context, 32, space.defaults(), guard=LeakageGuard(ds.name, ds.domains, [2]))
    assert calls == [] and entry.reused and entry.path.is_relative_to(SHIPPED_DIR)
    assert entry.info["val_acc"] >= 0.95


def test_no_shipped_environment_variable_makes_stores_train(monkeypatch):
    monkeypatch.setenv("DFBENCH_NO_SHIPPED", "1")
    assert ModelStore("unused").shipped is None
    monkeypatch.setenv("DFBENCH_NO_SHIPPED", "0")
    assert ModelStore("unused").shipped == SHIPPED_DIR


def test_demo_oracle_ddpm_is_shipped_for_trial_0_and_serves_oracle_rows_only(tmp_path, monkeypatch):
    from domainfusion_bench.diffusion import factory, oracle_ddpm

    monkeypatch.setattr(oracle_ddpm, "_train", lambda *a, **k: pytest.fail("the shipped oracle DDPM was retrained"))
    ds, store = _digitstyles(), ModelStore(tmp_path, shipped=SHIPPED_DIR)
    costs = CostMeter()
    base = factory.build_backbone("pixel_ddpm", dataset=ds, train_envs=[0, 1, 3], test_envs=[2], store=store,
                                  trial_seed=0, progress=False)
    backbone = factory.oracle_pixel_ddpm(base, dataset=ds, train_envs=[0, 1, 3], test_envs=[2], store=store,
                                         trial_seed=0, costs=costs, progress=False)
    assert store.shipped_path("oracle_pixel_ddpm", backbone.key) is not None
    assert sorted(backbone.seen_domains) == [0, 1, 2, 3] and backbone.guard.oracle_out_split
    assert costs.totals["reused_oracle_diffusion_train_seconds"] == costs.totals["oracle_diffusion_train_seconds"] > 0
    card = json.loads((store.shipped_path("oracle_pixel_ddpm", backbone.key) / "card.json").read_text())
    assert card["seen_domains"] == ["poster", "crayon", "stencil", "chalk"]
    assert card["info"]["trained_on"]["stencil"]["n"] == len(split_indices(len(ds.envs[2]), 0, 2, 0.2)[0])
    with pytest.raises(DfbenchError, match="leakage guard"):  # a DG row's guard refuses it
        backbone.restrict([2])
