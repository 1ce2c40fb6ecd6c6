"""Resume points: the state saved after each record (model, optimizers, meters, every generator) and
a run restored from it; without one, records a killed run left past its last resume point are dropped."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.training.data_setup import data_to_device
from domainfusion_bench.training.runtime import Runtime
from domainfusion_bench.training.setup import Run


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and lists (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_state(run: Run, step: int, elapsed: float) -> dict[str, Any]:
    """The resume point after ``step``'s record."""
    return {"step": step, "elapsed": elapsed, "algorithm": run.algorithm.resume_state(),
            "costs": run.context.costs.state_dict(), "metrics": run.context.metrics.state_dict(), "rng": _rng_state(),
            "diverged_at": run.diverged_at}


def load_agreed(runtime: Runtime, path) -> dict[str, Any] | None:
    """The resume point as the main rank judges it: only the main rank may find it corrupt and move it
    aside; it tells the others whether to resume, and they then read the file it read. All ranks resume
    or all restart: a rank that cannot read what the main one read stops every rank with one error."""
    # accelerate's CPU device under several processes is "cpu:<rank>", which torch.load cannot map to
    where = "cpu" if runtime.device.type == "cpu" else runtime.device
    state = runfiles.load_resume(path, map_location=where) if runtime.is_main else None
    if runtime.world == 1:
        return state
    from accelerate.utils import broadcast_object_list

    resuming = broadcast_object_list([state is not None])[0]
    failed = ""
    if resuming and not runtime.is_main:
        try:
            state = torch.load(path, map_location=where, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure: the ranks must not split
            failed = f"{type(err).__name__}: {err}".splitlines()[0]
    failures = runtime.sum_over_ranks(torch.tensor([float(bool(failed))], device=runtime.device))
    if failures.item() > 0:
        raise DfbenchError(f"the main process resumes from {path}, but {int(failures.item())} other process(es) could "
                           f"not read it{f' ({failed})' if failed else ''}. Check that every process sees the same "
                           f"output dir (a shared file system), then run again.")
    return state


def resume(run: Run) -> None:
    """Continue ``run`` from its resume point, when it has a readable one (the main rank decides)."""
    runtime, run_dir = run.runtime, run.run_dir
    state = load_agreed(runtime, run_dir / runfiles.RESUME)
    if state is not None:
        restored = run.algorithm.load_resume_state(state["algorithm"], run.context)
        if restored is not None:
            run.train_splits = list(restored)
            data_to_device(run.train_splits, runtime.device, run.speed)
        run.context.costs.load_state_dict(state["costs"])
        run.context.metrics.load_state_dict(state.get("metrics", {}))
        _set_rng_state(state["rng"])
        run.start_step, run.elapsed_before = state["step"] + 1, state["elapsed"]
        run.diverged_at = state.get("diverged_at")
        if runtime.is_main:
            runfiles.keep_records_through(run_dir, state["step"])
            print(f"resuming from step {run.start_step}")
    elif runtime.is_main:
        # killed after a record but before its resume point: those records are redone from step 0
        runfiles.keep_records_through(run_dir, -1)
