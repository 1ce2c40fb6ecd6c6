"""How fast ``dfbench collect`` is on a big sweep: generated run dirs, then load, select and render.

The generated sweep has DomainBed's shape: one 4-domain dataset, single and pair test envs (for
leave-one-domain-out), several algorithms, hparams seeds and trials, and ``checkpoints`` records per
run with every key a dfbench record has (accuracies, losses, costs, hparams, args).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from domainfusion_bench.errors import DfbenchError

try:  # writing 1.8M records is the slow part of the benchmark; orjson writes the same JSON ~10x faster
    import orjson

    def _dumps(record: dict[str, Any]) -> bytes:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
except ImportError:  # pragma: no cover
    def _dumps(record: dict[str, Any]) -> bytes:
        return json.dumps(record, sort_keys=True).encode()

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
ALGORITHMS = ("ERM", "MixStyle", "EFDM", "CDGA", "DomainFusion")
N_TRIALS = 3


def write_sweep(root: str | Path, n_records: int, checkpoints: int = 18) -> dict[str, int]:
    """Write about ``n_records`` records (runs of ``checkpoints`` records) under ``root``; returns counts."""
    if n_records < checkpoints:
        raise DfbenchError(f"--collect needs at least {checkpoints} records (one run), got {n_records}")
    root = Path(root)
    n = len(DOMAINS)
    tests = [[t] for t in range(n)] + [[a, b] for a in range(n) for b in range(a + 1, n)]
    n_runs = math.ceil(n_records / checkpoints)
    per_hparam = len(ALGORITHMS) * len(tests) * N_TRIALS
    n_hparams = math.ceil(n_runs / per_hparam)
    rng = random.Random(0)
    runs = 0
    combos = itertools.product(range(n_hparams), ALGORITHMS, map(tuple, tests), range(N_TRIALS))
    for hp, algorithm, test_envs, trial in itertools.islice(combos, n_runs):
        run = root / f"{algorithm}_{'-'.join(map(str, test_envs))}_h{hp}_t{trial}"
        run.mkdir(parents=True)
        args = {"dataset": "PACS", "algorithm": algorithm, "test_envs": list(test_envs), "hparams_seed": hp,
                "trial_seed": trial, "seed": rng.randrange(2**31), "data_dir": "datasets", "output_dir": str(run)}
        hparams = {"lr": 10 ** rng.uniform(-5, -3.5), "batch_size": rng.randrange(8, 45), "weight_decay": 0.0}
        lines = []
        for k in range(checkpoints):
            step = min(300 * k, 5000)
            record: dict[str, Any] = {"step": step, "epoch": step / 70, "loss": rng.random(), "step_time": 0.2,
                                      "data_time": 0.01, "images_per_s": 480.0, "mem_gb": 7.5, "wall_time": 60.0 * k,
                                      "hparams": hparams, "args": args}
            for i in range(n):
                if i in test_envs:
                    record[f"env{i}_in_acc"] = rng.random()
                record[f"env{i}_out_acc"] = rng.random()
            lines.append(_dumps(record))
        (run / "results.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        (run / "splits.json").write_text(json.dumps({f"env{i}": {"domain": d, "in": [], "out": []}
                                                     for i, d in enumerate(DOMAINS)}))
        (run / "done").write_text("done\n")
        runs += 1
    return {"runs": runs, "records": runs * checkpoints}


def bench_collector(n_records: int, workdir: str | Path | None = None) -> dict[str, Any]:
    """Seconds to load the records, run all three selection methods, and render the text leaderboard."""
    from domainfusion_bench.collect import load_records
    from domainfusion_bench.tables import leaderboard_from_collection, render

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        started = time.perf_counter()
        counts = write_sweep(tmp, n_records)
        generate = time.perf_counter() - started
        gc.collect()  # the writer's garbage is not the collector's

        wall, cpu = {}, {}  # wall clock, and CPU time (on a shared machine: what it costs)
        clock = (time.perf_counter(), _cpu_seconds())
        coll = load_records(tmp, warn=False)
        clock = _lap("load", clock, wall, cpu)
        if len(coll.records) != counts["records"]:
            raise AssertionError(f"collector read {len(coll.records)} of {counts['records']} records")
        board = leaderboard_from_collection(coll, selections=["iid", "loo", "oracle"])
        clock = _lap("select", clock, wall, cpu)
        text = render(board, "text")
        _lap("render", clock, wall, cpu)
    total = sum(wall.values())
    return {**counts, "generate_seconds": generate, "load_seconds": wall["load"],
            "select_and_tables_seconds": wall["select"], "render_seconds": wall["render"], "total_seconds": total,
            "records_per_s": counts["records"] / total, "table_lines": text.count("\n"),
            "load_cpu_seconds": cpu["load"], "select_and_tables_cpu_seconds": cpu["select"],
            "render_cpu_seconds": cpu["render"], "total_cpu_seconds": sum(cpu.values()),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the collector's reader processes)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _lap(name: str, clock: tuple[float, float], wall: dict[str, float], cpu: dict[str, float]) -> tuple[float, float]:
    now = (time.perf_counter(), _cpu_seconds())
    wall[name], cpu[name] = now[0] - clock[0], now[1] - clock[1]
    return now


def format_collector(result: dict[str, Any]) -> str:
    return (f"collector: {result['records']} records in {result['runs']} runs (written in "
            f"{result['generate_seconds']:.1f} s)\n"
            f"                      wall s    CPU s\n"
            f"  load records        {result['load_seconds']:8.2f} {result['load_cpu_seconds']:8.2f}\n"
            f"  selection + tables  {result['select_and_tables_seconds']:8.2f} "
            f"{result['select_and_tables_cpu_seconds']:8.2f}  (iid, loo, oracle)\n"
            f"  render text         {result['render_seconds']:8.2f} {result['render_cpu_seconds']:8.2f}\n"
            f"  total               {result['total_seconds']:8.2f} {result['total_cpu_seconds']:8.2f}  "
            f"({result['records_per_s']:.0f} records/s; 1-min load average {result['load_average']:.1f})\n")
