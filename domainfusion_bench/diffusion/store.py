"""One cached-model store for every helper model a method trains before or during a run: the pixel DDPM,
the validity judge, domain classifiers, guidance networks, DiTi encoders.

    entry = context.models.get_or_train("validity_judge", dataset=ds, train_envs=[0, 2], trial_seed=0,
                                        holdout_fraction=0.2, config={...}, build=make_net, train=fit,
                                        costs=context.costs, made_by=context.made_by, guard=guard)
    entry.module      # trained, in eval mode, on ``device``

A model is keyed by (kind, dataset with its domains and sizes, training domains, domains it saw, split seed,
holdout fraction, config). The first caller trains it under a file lock (parallel runs wait instead of
training twice) and saves it atomically: a safetensors state_dict and a JSON meta (who made it, its cost,
the domains it saw), so loading never unpickles anything. Models shipped with the package
(``domainfusion_bench/shipped_models/<kind>/<key[:24]>/``, each with ``card.json``, its model card) are found by
the same key as a trained one: the card's checksums are verified and the leakage guard reads the domains the
card lists, then the model is used in place (charged as reused: its training cost was paid by whoever made it). Training does not touch the caller's random
streams. A model made by someone else is charged as ``<cost>`` and ``reused_<cost>``: tables can show what
a result needed and what the run paid. The leakage guard reads the domains a model saw before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from domainfusion_bench.errors import DfbenchError

FORMAT = 1
META = "meta.json"
WEIGHTS = "weights.safetensors"
CARD = "card.json"  # a shipped model's machine-readable card (MODEL_CARD.md beside it is the human one)
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "shipped_models"
NO_SHIPPED_ENV = "DFBENCH_NO_SHIPPED"  # set (to 1): stores ignore shipped models and train (to reproduce one)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(folder: Path) -> list[str]:
    """Every file of a model folder except its cards, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in (CARD, "MODEL_CARD.md") and not p.name.startswith("."))


def verify_shipped(folder: Path, card: dict[str, Any], dataset, guard=None) -> list[int]:
    """Check a shipped model against its card before anything loads it: the dataset and the domains the card
    lists as seen (the leakage guard refuses a run whose held-out domain is among them) and the sha256 of every
    file. Returns the seen domains' indices."""
    kind, key = card.get("kind", "?"), str(card.get("key", ""))
    what = f"the shipped {kind} {key[:12]} ({folder})"
    if card.get("dataset") != dataset.name:
        raise DfbenchError(f"{what} is a model of {card.get('dataset')!r}, not {dataset.name!r}")
    names = card.get("seen_domains")
    if not isinstance(names, list) or not names:
        raise DfbenchError(f"{what}: its model card lists no seen_domains; a shipped model must say what it saw")
    unknown = [n for n in names if n not in dataset.domains]
    if unknown:
        raise DfbenchError(f"{what}: its model card lists domains {unknown} that {dataset.name} does not have "
                           f"(its domains: {', '.join(dataset.domains)})")
    seen = sorted(dataset.domains.index(n) for n in names)
    if guard is not None:
        guard.check_seen(seen, f"{what}, whose model card lists {', '.join(names)} as seen")
    files = card.get("files") or {}
    present = _model_files(folder)
    if sorted(files) != present:
        raise DfbenchError(f"{what}: its files {present} are not the ones its model card lists {sorted(files)}; "
                           f"reinstall dfbench, or delete {folder} and train the model with: {card.get('command')}")
    for name, expected in sorted(files.items()):
        actual = sha256_of(folder / name)
        if actual != expected:
            raise DfbenchError(f"{what}: checksum mismatch for {name}: sha256 {actual}, its model card says {expected}. "
                               f"The file is damaged or was changed; reinstall dfbench, or delete {folder} and train "
                               f"the model with: {card.get('command')}")
    return seen


def write_shipped(source: Path, dest_root: Path, *, kind: str, key: str, identity: dict[str, Any], dataset,
                  seen_envs: Sequence[int], train_seconds: float, command: str, info: dict[str, Any],
                  card_text: str = "", half: bool = False) -> Path:
    """Copy a model folder (``save``'s layout) into ``dest_root/<kind>/<key[:24]>`` with its card.json (and
    ``card_text`` as MODEL_CARD.md). ``half``: store float32 tensors of the safetensors files as float16 (half
    the size; loading casts them back into the float32 modules)."""
    from safetensors.torch import load_file, save_file

    if ModelStore.key_of(identity) != key:
        raise DfbenchError(f"write_shipped: the identity does not hash to the key {key[:12]}")
    dest = Path(dest_root) / kind / key[:24]
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(META, CARD, "*.lock", ".*"))
    if half:
        for f in dest.rglob("*.safetensors"):
            tensors = load_file(str(f))
            save_file({k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in tensors.items()}, str(f))
    for f in dest.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    card = {"format": FORMAT, "kind": kind, "key": key, "identity": identity, "dataset": dataset.name,
            "seen_domains": [dataset.domains[e] for e in sorted(int(e) for e in seen_envs)],
            "train_seconds": float(train_seconds), "made_by": f"dfbench shipped {kind}", "command": command,
            "weights_dtype": "float16" if half else "float32", "info": info,
            "files": {name: sha256_of(dest / name) for name in _model_files(dest)}}
    (dest / CARD).write_text(json.dumps(card, indent=1, default=str) + "\n")
    if card_text:
        (dest / "MODEL_CARD.md").write_text(card_text)
    return dest


@dataclass
class StoredModel:
    module: Any  # an nn.Module (or whatever ``load`` returns, e.g. a diffusion Backbone)
    key: str
    path: Path
    meta: dict[str, Any]
    reused: bool  # made by another caller than ``made_by``

    @property
    def info(self) -> dict[str, Any]:
        return self.meta.get("info", {})

    @property
    def train_seconds(self) -> float:
        return float(self.meta.get("train_seconds", 0.0))


def save_state(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path / WEIGHTS))


def load_state(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path / WEIGHTS)))
    return module


class ModelStore:
    def __init__(self, root: str | Path, heartbeat: Callable[[], None] | None = None,
                 shipped: str | Path | None | bool = True):
        self.root = Path(root)
        self.heartbeat = heartbeat or (lambda: None)
        if shipped is True:  # the package's, unless $DFBENCH_NO_SHIPPED is set
            shipped = None if os.environ.get(NO_SHIPPED_ENV, "") not in ("", "0") else SHIPPED_DIR
        self.shipped = Path(shipped) if shipped not in (None, False) else None  # None: never use shipped models

    def shipped_path(self, kind: str, key: str) -> Path | None:
        """The shipped model of this key, if the package has one (its card names the same key)."""
        if self.shipped is None:
            return None
        folder = self.shipped / kind / key[:24]
        if not (folder / CARD).exists():
            return None
        card = json.loads((folder / CARD).read_text())
        return folder if card.get("key") == key else None

    def identity(self, kind: str, *, dataset, train_envs: Sequence[int], trial_seed: int, holdout_fraction: float,
                 config: dict[str, Any], seen_envs: Sequence[int] | None = None,
                 few_shot: dict[int, int] | None = None) -> dict[str, Any]:
        train_envs = sorted(int(e) for e in train_envs)
        return {"format": FORMAT, "kind": kind, "dataset": dataset.name, "domains": list(dataset.domains),
                "sizes": dataset.sizes(), "train_envs": train_envs,
                "seen_envs": sorted(int(e) for e in (train_envs if seen_envs is None else seen_envs)),
                "few_shot": {str(k): int(v) for k, v in sorted((few_shot or {}).items())},
                "trial_seed": int(trial_seed), "holdout_fraction": float(holdout_fraction), "config": config}

    @staticmethod
    def key_of(identity: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def path_of(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:24]

    def training_elsewhere(self, kind: str) -> bool:
        """Whether another process holds the lock of some model of ``kind`` right now (it is training it)."""
        from filelock import FileLock, Timeout

        for lock in sorted((self.root / kind).glob("*.lock")):
            probe = FileLock(str(lock), timeout=0)
            try:
                probe.acquire()
            except Timeout:
                return True
            probe.release()
        return False

    def get_or_train(self, kind: str, *, dataset, train_envs: Sequence[int], trial_seed: int,
                     holdout_fraction: float, config: dict[str, Any], build: Callable[[], Any],
                     train: Callable[[Any], dict[str, Any] | None], seen_envs: Sequence[int] | None = None,
                     few_shot: dict[int, int] | None = None, guard=None, costs=None, made_by: str | None = None,
                     device: str | torch.device = "cpu", cost_name: str | None = None,
                     save: Callable[[Any, Path], None] | None = None,
                     load: Callable[[Path, Any], Any] | None = None) -> StoredModel:
        """The cached model for this identity, training it first (``train(build())``) if there is none.

        ``seen_envs``: domains whose data trains it (default ``train_envs``); ``few_shot``: {held-out domain:
        number of unlabelled images} for the labelled few-shot-target track only. ``save``/``load`` replace
        the safetensors default (e.g. a diffusers folder); ``load(path, device)`` returns the module.
        """
        from filelock import FileLock

        ident = self.identity(kind, dataset=dataset, train_envs=train_envs, trial_seed=trial_seed,
                              holdout_fraction=holdout_fraction, config=config, seen_envs=seen_envs, few_shot=few_shot)
        if guard is not None:
            guard.check_seen(ident["seen_envs"], f"a {kind} trained on them")
            self._check_few_shot(guard, ident["few_shot"], kind)
        key = self.key_of(ident)
        path = self.path_of(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        device = torch.device(device)
        save = save or save_state
        rng_devices = [device] if device.type == "cuda" else []
        trained_now = False
        shipped = self.shipped_path(kind, key) if not (path / META).exists() else None
        if shipped is not None:
            return self._load_shipped(kind, key, ident, shipped, dataset, build, guard, costs, device, cost_name,
                                      load, rng_devices)
        with FileLock(str(path.parent / f"{path.name}.lock")):
            if not (path / META).exists():
                trained_now = True
                self.heartbeat()
                with torch.random.fork_rng(devices=rng_devices):  # the caller's streams stay untouched
                    module = build()
                    if isinstance(module, torch.nn.Module):
                        module.to(device)
                    start = time.perf_counter()
                    info = train(module) or {}
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                meta = {"key": key, "identity": ident, "made_by": made_by, "host": socket.gethostname(),
                        "created": time.time(), "train_seconds": seconds, "device": str(device), "info": info}
                tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                save(module, tmp)
                (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
                shutil.rmtree(path, ignore_errors=True)  # a folder without meta is an interrupted save
                os.replace(tmp, path)
                self.heartbeat()
            meta = json.loads((path / META).read_text())
        if meta.get("key") != key:
            raise DfbenchError(f"cached {kind} at {path} has key {str(meta.get('key'))[:12]}, expected {key[:12]}: "
                               "delete that folder and run again")
        if guard is not None:  # what the saved model says it saw, not only what we asked for
            guard.check_seen(meta["identity"]["seen_envs"], f"the cached {kind} {key[:12]}")
        with torch.random.fork_rng(devices=rng_devices):  # building a module to load into draws random numbers
            module = load(path, device) if load is not None else load_state(build(), path)
        if isinstance(module, torch.nn.Module):
            module.to(device).eval()
            module.requires_grad_(False)
        reused = not trained_now and (made_by is None or meta.get("made_by") != made_by)
        if costs is not None:
            name = cost_name or f"{kind}_train_seconds"
            costs.add(name, meta["train_seconds"])
            if reused:
                costs.add(f"reused_{name}", meta["train_seconds"])
        return StoredModel(module, key, path, meta, reused)

    def _load_shipped(self, kind, key, ident, folder: Path, dataset, build, guard, costs, device, cost_name, load,
                      rng_devices) -> StoredModel:
        card = json.loads((folder / CARD).read_text())
        if self.key_of(card.get("identity", {})) != key:
            raise DfbenchError(f"the shipped {kind} at {folder}: its model card's identity does not hash to its key "
                               f"{key[:12]}; reinstall dfbench or delete that folder")
        verify_shipped(folder, card, dataset, guard)  # the identity's seen_envs are the caller's own: the card's are checked
        with torch.random.fork_rng(devices=rng_devices):
            module = load(folder, device) if load is not None else load_state(build(), folder)
        if isinstance(module, torch.nn.Module):
            module.float().to(device).eval()
            module.requires_grad_(False)
        meta = {"key": key, "identity": ident, "made_by": card.get("made_by"), "train_seconds": card["train_seconds"],
                "device": card.get("info", {}).get("device"), "info": card.get("info", {}), "shipped": str(folder)}
        if costs is not None:
            name = cost_name or f"{kind}_train_seconds"
            costs.add(name, meta["train_seconds"])
            costs.add(f"reused_{name}", meta["train_seconds"])
        return StoredModel(module, key, folder, meta, True)

    @staticmethod
    def _check_few_shot(guard, few_shot: dict[str, int], kind: str) -> None:
        if not few_shot:
            return
        total = sum(few_shot.values())
        check = getattr(guard, "check_target_images", None)
        if check is None:
            raise DfbenchError(f"a {kind} that uses held-out images needs the labelled few-shot-target mode")
        check(total, labelled=False)
