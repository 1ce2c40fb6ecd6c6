"""``resume.pt``: the state a relaunch continues from, written durably and loaded without unpickling
arbitrary objects; a corrupt one is moved aside."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from domainfusion_bench.runfiles.locks import claimed


def save_resume(path: Path, state: Mapping[str, Any]) -> None:
    """Write a resume point atomically and durably: temp file, fsync, rename, fsync of the directory.

    ``state`` holds tensors, numbers, strings, bools, None, lists, tuples and dicts only, so that
    ``load_resume`` can read it with ``weights_only=True`` (no arbitrary unpickling).
    """
    import torch

    _check_plain(state, "state")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    try:
        with claimed(path.parent):
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # left only when the claim was lost
    _fsync_dir(path.parent)


def _check_plain(value: Any, where: str) -> None:
    """Fail at save time, naming the key, when a resume point holds something ``weights_only`` cannot load
    (numpy arrays, custom objects): found only at the next load, it would cost the run its progress."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            _check_plain(item, f"{where}[{k}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"resume point: key {key!r} of {where} is a {type(key).__name__}; use str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"resume point: {where} is a {type(value).__module__}.{type(value).__name__}; resume state holds "
                    "only tensors, numbers, strings, bools, None, lists and dicts (convert it in extra_state)")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_resume(path: Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The resume point at ``path``; None when there is none, or when it is unreadable: then the run says
    which file is corrupt, moves it aside (``<name>.corrupt``) and restarts cleanly from step 0."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not a dfbench resume point")
        return state
    except Exception as err:  # truncated zip, bad pickle, a foreign object: the file is of no use
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(FileNotFoundError):  # another rank moved it already
            os.replace(path, aside)
        print(f"dfbench train: warning: resume point {path} is corrupt ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}); moved to {aside.name}, restarting from step 0",
              file=sys.stderr)
        return None
