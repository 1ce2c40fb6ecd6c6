"""Run directories made by hand, for the collector / selection / table tests.

``write_run`` writes one run dir as dfbench or as DomainBed would (results.jsonl, done file, and for
dfbench a splits.json naming the domains); ``make_sweep`` writes a whole deterministic sweep.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence


def record(dataset: str, algorithm: str, test_envs: Sequence[int], hparams_seed: int, trial_seed: int, step: int,
           **accs: float) -> dict[str, Any]:
    """A minimal dfbench-style record: args + step + the given env accs."""
    rec = {"args": {"dataset": dataset, "algorithm": algorithm, "test_envs": list(test_envs),
                    "hparams_seed": hparams_seed, "trial_seed": trial_seed}, "step": step}
    rec.update(accs)
    return rec


def domainbed_args(dataset: str, algorithm: str, test_envs: Sequence[int], hparams_seed: int, trial_seed: int,
                   output_dir: str) -> dict[str, Any]:
    """``vars(args)`` of DomainBed's train.py, as it lands in every record."""
    return {"algorithm": algorithm, "checkpoint_freq": None, "data_dir": "/data/domainbed", "dataset": dataset,
            "holdout_fraction": 0.2, "hparams": None, "hparams_seed": hparams_seed, "output_dir": output_dir,
            "save_model_every_checkpoint": False, "seed": 0, "skip_model_save": False, "steps": None,
            "task": "domain_generalization", "test_envs": list(test_envs), "trial_seed": trial_seed,
            "uda_holdout_fraction": 0}


def write_run(root: Path, name: str, records: list[dict[str, Any]], done: bool = True,
              domains: Sequence[str] | None = None) -> Path:
    run = Path(root) / name
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "results.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    if done:
        (run / "done").write_text("done\n")
    if domains:
        (run / "splits.json").write_text(json.dumps({f"env{i}": {"domain": d, "in": [], "out": []}
                                                     for i, d in enumerate(domains)}))
    return run


def _u(*key: Any) -> float:
    """A deterministic number in [0, 1) from a key."""
    return int(hashlib.md5(repr(key).encode()).hexdigest()[:8], 16) / 2**32


def fake_acc(*key: Any) -> float:
    """An accuracy on a 1/400 grid (exact in binary-free arithmetic up to printing)."""
    return round(0.5 + 0.45 * _u(*key), 4)


def make_sweep(root: Path, datasets: dict[str, Sequence[str]], algorithms: Sequence[str], n_trials: int = 3,
               n_hparams: int = 2, steps: Sequence[int] = (0, 100, 200), pairs: bool = True,
               style: str = "dfbench", costs: bool = True) -> Path:
    """Every run of a sweep (singles, plus pairs when ``pairs``), accuracies from ``fake_acc``."""
    root = Path(root)
    for dataset, domains in datasets.items():
        n = len(domains)
        tests = [[t] for t in range(n)] + ([[a, b] for a in range(n) for b in range(a + 1, n)] if pairs else [])
        for algorithm in algorithms:
            for test_envs in tests:
                for hp in range(n_hparams):
                    for trial in range(n_trials):
                        name = f"{dataset}_{algorithm}_{'-'.join(map(str, test_envs))}_h{hp}_t{trial}"
                        recs = []
                        for k, step in enumerate(steps):
                            key = (dataset, algorithm, tuple(test_envs), hp, trial, step)
                            rec: dict[str, Any] = {"step": step, "epoch": step / 10, "loss": 1.0 / (step + 1)}
                            for i in range(n):
                                if style == "domainbed" or i in test_envs:
                                    rec[f"env{i}_in_acc"] = fake_acc(*key, i, "in")
                                rec[f"env{i}_out_acc"] = fake_acc(*key, i, "out")
                            if style == "domainbed":
                                rec.update(args=domainbed_args(dataset, algorithm, test_envs, hp, trial,
                                                               str(root / name)),
                                           hparams={"lr": 5e-5, "batch_size": 32}, mem_gb=1.5, step_time=0.1)
                            else:
                                rec.update(args={"dataset": dataset, "algorithm": algorithm, "test_envs": test_envs,
                                                 "hparams_seed": hp, "trial_seed": trial, "data_dir": "datasets",
                                                 "output_dir": str(root / name)},
                                           hparams={"lr": 1e-3, "batch_size": 64}, step_time=0.01)
                                if costs:
                                    speed = {"ERM": 1.0}.get(algorithm, 3.0)
                                    rec.update(mem_gb=0.25 * speed, wall_time=speed * 10.0 * (k + 1),
                                               images_per_s=1000.0 / speed)
                                    if algorithm != "ERM":
                                        rec.update(cost_generated_images=100.0 * (k + 1), cost_nfes=2500.0 * (k + 1),
                                                   cost_generation_seconds=5.0 * (k + 1))
                            recs.append(rec)
                        write_run(root, name, recs, domains=domains if style == "dfbench" else None)
    return root


def write_fake_previews(run: Path, domains: Sequence[str], og: bool = False, oracle: bool = False,
                        kind: str = "img2img", n: int = 8, seed: int = 0) -> None:
    """A run's previews/ as a generative method writes them (random 8x8 images), through the real writer:
    per training domain one group; +OG runs also their unguided and round strips; some images judged invalid."""
    import numpy as np

    from domainfusion_bench.runfiles import PreviewStrip, write_previews

    rng = np.random.default_rng(seed)
    strips = []
    for d, domain in enumerate(domains[1:]):
        target = domains[0] if oracle else domains[1 + (d + 1) % (len(domains) - 1)]
        sources = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8) if kind == "img2img" else None
        levels = ["unguided", "round1", "distilled"] if og else [None]
        for og_label in levels:
            strips.append(PreviewStrip(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8), "base", domain, kind,
                                       target=target, sources=sources, og=og_label, oracle_target=oracle,
                                       group=f"base-{domain}", valid=[bool(k % 3) for k in range(n)],
                                       guidance=[] if og_label in (None, "unguided") else ["ValidityGuidance"]))
    write_previews(run, strips)


def write_dfbench_run(root: Path, name: str, accs: Sequence[dict[str, float]], fingerprint_edit: dict | None = None,
                      protocol: dict | None = None, older_hparams: dict | None = None, **train_args: Any) -> Path:
    """A run dir as ``dfbench train`` leaves it: records whose ``args`` / ``hparams`` are real ones, and
    its ``fingerprint.json`` (``fingerprint_edit`` changes it, as an older dfbench or a hand edit would).
    One record per entry of ``accs`` (steps 0, 1, ...); ``protocol`` changes the recorded settings;
    ``older_hparams`` changes the resolved hyperparameters of records and fingerprint alike (older defaults)."""
    import dataclasses

    from domainfusion_bench.training import TrainArgs, resolve_hparams, run_fingerprint

    args = TrainArgs(**{"dataset": "RotatedDigits", "algorithm": "ERM", "test_envs": [0], **train_args})
    hparams = {**resolve_hparams(args), **(older_hparams or {})}
    record_args = {**dataclasses.asdict(args), "output_dir": str(Path(root) / name),
                   "protocol": {"precision": "fp32", "cudnn_benchmark": False, "eval_augment": args.eval_augment,
                                "eval_splits": args.eval_splits, "image_store": {"used": False}, "dataset": [],
                                **(protocol or {})}}
    recs = [{"step": step, "args": record_args, "hparams": hparams, **acc} for step, acc in enumerate(accs)]
    run = write_run(root, name, recs, domains=["0", "15", "30", "45", "60", "75"])
    fingerprint = run_fingerprint(args, hparams)
    for key, value in (fingerprint_edit or {}).items():
        if key == "hparams_resolved":
            value = {**fingerprint[key], **value}
        fingerprint[key] = value
    (run / "fingerprint.json").write_text(json.dumps(fingerprint, sort_keys=True))
    return run
