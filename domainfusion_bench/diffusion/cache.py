"""Content-addressed generation cache: images on disk plus a JSONL manifest.

An image's key hashes (backbone key, dataset, sampler settings incl. strength and guidance terms,
source image content, condition, seed). ``<root>/images/<k[:2]>/<key>.png`` holds the image (8-bit,
as the training pipeline reads it; a fresh image is quantised the same way, so a hit equals a miss
exactly) and ``<root>/manifest.jsonl`` one line per image: source, condition, NFEs, seconds, which
domains it depends on, who made it.

Cost: an image made by this call is charged to the caller as ``generated_images``/``nfe``/
``generation_seconds``; an image found in the cache is reported with its original cost under the same
names *and* under ``reused_*``, so a table can show what a result needed and what the run paid, and
sums over runs can count every image once (subtract the reused part). Guidance-term evaluations are
charged likewise as ``guidance_evals`` / ``reused_guidance_evals`` (only when a sampler has terms).

Concurrency: images are made in chunks, each under its own file lock named after the chunk's keys. Two
runs asking for different images generate at the same time; two runs asking for the same ones make them
once (the second waits on the lock, then finds them in the manifest). Speed-only settings (the sampler's
``batch_size``) are not part of any key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from domainfusion_bench.diffusion.samplers import DDIMSampler
from domainfusion_bench.errors import DfbenchError

MANIFEST = "manifest.jsonl"


@dataclass
class Request:
    """One image to generate: from ``source`` (img2img) or from noise (``source`` None)."""

    class_id: int
    domains: dict[int, float]  # target domain mix ({} = no domain condition)
    seed: int
    source: torch.Tensor | None = None  # [C, H, W] in [0, 1]
    source_domain: int | None = None
    source_ref: dict[str, Any] = field(default_factory=dict)  # e.g. {"domain": "plain", "index": 17}
    prompt: str | None = None


@dataclass
class GenerationStats:
    made_images: int = 0
    made_nfe: float = 0.0
    made_seconds: float = 0.0
    reused_images: int = 0
    reused_nfe: float = 0.0
    reused_seconds: float = 0.0
    made_guidance_evals: float = 0.0
    reused_guidance_evals: float = 0.0

    def charge(self, costs) -> None:
        """Add to a CostMeter: totals under generated_images/nfe/generation_seconds, cache hits also as reused_*."""
        if costs is None:
            return
        costs.add("generated_images", self.made_images + self.reused_images)
        costs.add("nfe", self.made_nfe + self.reused_nfe)
        costs.add("generation_seconds", self.made_seconds + self.reused_seconds)
        costs.add("reused_generated_images", self.reused_images)
        costs.add("reused_nfe", self.reused_nfe)
        costs.add("reused_generation_seconds", self.reused_seconds)
        if self.made_guidance_evals or self.reused_guidance_evals:  # samplers without terms keep their records as before
            costs.add("guidance_evals", self.made_guidance_evals + self.reused_guidance_evals)
            costs.add("reused_guidance_evals", self.reused_guidance_evals)

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def quantize(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def image_digest(x: torch.Tensor) -> str:
    q = quantize(x).cpu().numpy()
    return hashlib.sha256(str(q.shape).encode() + q.tobytes()).hexdigest()[:32]


class GenerationCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._entries: dict[str, dict[str, Any]] = {}  # manifest lines read so far (the file only grows)
        self._offset = 0

    def _read_new(self) -> dict[str, dict[str, Any]]:
        """Entries appended to the manifest since the last read (complete lines only), merged into memory."""
        path = self.root / MANIFEST
        if not path.exists():
            return self._entries
        if path.stat().st_size < self._offset:  # replaced by a shorter file: start over
            self._entries, self._offset = {}, 0
        with open(path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(entry, dict) and "key" in entry and "file" in entry:
                self._entries[entry["key"]] = entry
        self._offset += end
        return self._entries

    # --- storage ---------------------------------------------------------------------------------
    def image_path(self, key: str, channels: int) -> Path:
        ext = "png" if channels in (1, 3) else "npy"
        return self.root / "images" / key[:2] / f"{key}.{ext}"

    def manifest(self) -> dict[str, dict[str, Any]]:
        """key -> entry, for entries whose image file exists (a truncated last line is skipped)."""
        path = self.root / MANIFEST
        entries: dict[str, dict[str, Any]] = {}
        if not path.exists():
            return entries
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and "key" in entry and (self.root / entry["file"]).exists():
                    entries[entry["key"]] = entry
        return entries

    def _write_image(self, path: Path, q: torch.Tensor) -> None:
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        arr = q.permute(1, 2, 0).cpu().numpy()
        if path.suffix == ".png":
            Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp, format="PNG")
        else:
            with open(tmp, "wb") as f:
                np.save(f, arr)
        os.replace(tmp, path)

    def load_image(self, entry: dict[str, Any]) -> torch.Tensor:
        return self.load_image_uint8(entry).float() / 255.0

    def load_image_uint8(self, entry: dict[str, Any]) -> torch.Tensor:
        from PIL import Image

        path = self.root / entry["file"]
        if path.suffix == ".png":
            arr = np.array(Image.open(path))
            arr = arr[..., None] if arr.ndim == 2 else arr
        else:
            arr = np.load(path)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)

    def _append(self, entries: Sequence[dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
        fd = os.open(self.root / MANIFEST, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a writer killed mid-line: do not glue onto it
                data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- generation --------------------------------------------------------------------------------
    def generate(self, sampler: DDIMSampler, requests: Sequence[Request], strength: float | None = None, *,
                 made_by: str | None = None, progress: bool = True, desc: str = "generating",
                 keep_on_device: bool = False, uint8: bool = False) -> tuple[torch.Tensor, GenerationStats]:
        """Images for ``requests`` (img2img at ``strength``, or full sampling when it is None), reusing
        cached ones. Returns ([N, C, H, W] in [0, 1] at the backbone's resolution, on CPU or, with
        ``keep_on_device``, on the backbone's device; stats). ``uint8``: the images as stored (uint8 0..255),
        which is how training pools keep them: a float copy of every generation is 4x the memory."""
        from tqdm.auto import tqdm

        backbone = sampler.backbone
        guard = backbone.guard
        img2img = strength is not None
        if img2img and any(r.source is None or r.source_domain is None for r in requests):
            raise DfbenchError("img2img requests need a source image and its source domain")
        if img2img:
            guard.check_sources({r.source_domain for r in requests})
        guard.check_text([r.prompt for r in requests], "a request's prompt")
        stats = GenerationStats()
        if not requests:
            return torch.zeros(0, backbone.image_channels, backbone.resolution, backbone.resolution), stats
        cond = backbone.condition([r.class_id for r in requests], [r.domains for r in requests],
                                  prompts=[r.prompt for r in requests] if any(r.prompt for r in requests) else None)
        sampler_key = sampler.key(strength if img2img else None)
        sources = [image_digest(r.source) if img2img else None for r in requests]
        keys = self._keys(backbone, sampler_key, requests, cond, sources)

        results: list[torch.Tensor | None] = [None] * len(requests)

        def take_hits(indices):
            entries = self._read_new()
            for i in indices:
                k = keys[i]
                if results[i] is None and k is not None and k in entries and (self.root / entries[k]["file"]).exists():
                    entry = entries[k]
                    guard.check_seen(entry["backbone_seen"], f"cached image {k[:12]}")
                    if entry["source_domain"] is not None:  # a source check even for oracle rows (check_seen is not)
                        guard.check_sources([entry["source_domain"]])
                    if not guard.allow_condition:
                        guard.check_seen(entry["condition_domains"], f"cached image {k[:12]} (its condition)")
                    results[i] = self.load_image_uint8(entry)
                    if made_by is not None and entry.get("made_by") == made_by:
                        # made by this very caller before it was interrupted: its own cost, not reuse
                        stats.made_images += 1
                        stats.made_nfe += entry["nfe"]
                        stats.made_seconds += entry["seconds"]
                        stats.made_guidance_evals += entry.get("guidance_evals", 0)
                    else:
                        stats.reused_images += 1
                        stats.reused_nfe += entry["nfe"]
                        stats.reused_seconds += entry["seconds"]
                        stats.reused_guidance_evals += entry.get("guidance_evals", 0)

        def finish():
            out = torch.stack(results)
            out = out if uint8 else out.float() / 255.0
            return (out.to(backbone.device) if keep_on_device else out), stats

        take_hits(range(len(requests)))
        todo = [i for i, r in enumerate(results) if r is None]
        if not todo:
            return finish()
        self.root.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(todo), desc=desc, disable=not progress, mininterval=1.0, dynamic_ncols=True, unit="img")
        chunk = max(1, sampler.config.batch_size)
        for start in range(0, len(todo), chunk):
            chunk_idx = todo[start:start + chunk]
            with self._chunk_lock([keys[i] for i in chunk_idx]):
                take_hits(chunk_idx)  # another process may have made some while we waited
                idx = [i for i in chunk_idx if results[i] is None]
                if not idx:
                    bar.update(len(chunk_idx))
                    continue
                sub = cond.select(idx)
                seeds = [requests[i].seed for i in idx]
                if img2img:
                    images = torch.stack([requests[i].source for i in idx])
                    out = sampler.img2img(images, sub, strength, seeds, [requests[i].source_domain for i in idx])
                else:
                    out = sampler.sample(sub, seeds)
                q = quantize(out.images)
                per_image = out.seconds / len(idx)
                new_entries = []
                for j, i in enumerate(idx):
                    results[i] = q[j].cpu()
                    stats.made_images += 1
                    stats.made_nfe += out.nfe[j]
                    stats.made_seconds += per_image
                    stats.made_guidance_evals += out.guidance_evals[j]
                    if keys[i] is None:
                        continue
                    path = self.image_path(keys[i], q.shape[1])
                    self._write_image(path, q[j])
                    r = requests[i]
                    new_entries.append({
                        "key": keys[i], "file": str(path.relative_to(self.root)), "backbone": backbone.key,
                        "backbone_kind": backbone.kind, "dataset": backbone.dataset,
                        "backbone_seen": sorted(backbone.seen_domains),
                        "source_domain": r.source_domain if img2img else None,
                        "source": {**r.source_ref, "sha": sources[i]} if img2img else None,
                        "condition": sub.describe(j, backbone.domains, backbone.classes),
                        "condition_domains": sorted(int(d) for d in r.domains if r.domains[d] > 0),
                        "sampler": sampler_key, "seed": int(r.seed), "nfe": out.nfe[j], "seconds": per_image,
                        "guidance_evals": out.guidance_evals[j],
                        "made_by": made_by, "created": time.time(),
                    })
                self._append(new_entries)
            bar.update(len(chunk_idx))
        bar.close()
        return finish()

    @staticmethod
    def _keys(backbone, sampler_key, requests, cond, sources) -> list[str | None]:
        if sampler_key is None:
            return [None] * len(requests)
        prompts = cond.meta.get("prompts", [None] * len(requests))
        return [_digest({"backbone": backbone.key, "dataset": backbone.dataset, "sampler": sampler_key,
                         "source": sources[i], "condition": cond.describe(i), "seed": int(r.seed), "prompt": prompts[i]})
                for i, r in enumerate(requests)]

    def keys(self, sampler: DDIMSampler, requests: Sequence[Request], strength: float | None = None) -> list[str | None]:
        """The cache key of each request (None: uncacheable), as ``generate`` computes them."""
        backbone = sampler.backbone
        cond = backbone.condition([r.class_id for r in requests], [r.domains for r in requests],
                                  prompts=[r.prompt for r in requests] if any(r.prompt for r in requests) else None)
        sources = [image_digest(r.source) if strength is not None else None for r in requests]
        return self._keys(backbone, sampler.key(strength), requests, cond, sources)

    def _chunk_lock(self, keys: Sequence[str | None]):
        """A file lock named after a chunk's keys (uncacheable images need none)."""
        import contextlib

        from filelock import FileLock

        real = sorted(k for k in keys if k is not None)
        if not real:
            return contextlib.nullcontext()
        name = _digest(real)[:24]
        (self.root / "locks" / name[:2]).mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / "locks" / name[:2] / f"{name}.lock"))

    def img2img(self, sampler, requests, strength: float, **kw):
        return self.generate(sampler, requests, strength, **kw)

    def sample(self, sampler, requests, **kw):
        return self.generate(sampler, requests, None, **kw)
