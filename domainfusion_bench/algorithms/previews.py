"""What a generative method keeps of its generations for the run's ``previews/`` (and the HTML
leaderboard): the first few images of a stage, with their sources, kind, guidance and the validity
judge's verdict, plus the same requests drawn again under other guidance where the method has
variants (oracle-guided rows: unguided and per round, the same sources and seeds).

``keep_preview`` is a method of ``GenerativeAlgorithm``; generation stages call it once per batch they
make. Preview draws are not charged to the run's costs: they are for people, not for the result.
"""

from __future__ import annotations

from typing import Sequence

import torch

from domainfusion_bench.diffusion.cache import Request, quantize
from domainfusion_bench.runfiles import PreviewStrip

PREVIEW_IMAGES = 8  # per strip


def target_of(request: Request) -> int | None:
    """The domain a request was generated toward: the heaviest one other than its source (None: no domain)."""
    others = {d: w for d, w in request.domains.items() if d != request.source_domain and w > 0}
    pool = others or request.domains
    return max(pool, key=pool.get) if pool else None


def pick(requests: Sequence[Request], test_envs: Sequence[int], oracle: bool, n: int = PREVIEW_IMAGES) -> list[int]:
    """Indices of the preview's requests: up to ``n`` toward one target (distinct sources where the
    requests go source by source), the held-out one for oracle rows (what makes them oracles), else the
    first request's target."""
    if not requests:
        return []
    targets = [target_of(r) for r in requests]
    held = [t for t in targets if t in test_envs]
    want = held[0] if oracle and held else targets[0]
    return [i for i, t in enumerate(targets) if t == want][:n]


def _judge(algorithm, context, images: torch.Tensor, labels: torch.Tensor) -> list[bool] | None:
    if not algorithm.hparams.get("og_measure") or not len(images):
        return None
    from domainfusion_bench.algorithms.validity import run_judge

    judge = run_judge(algorithm, context, algorithm.backbone(context))
    return [bool(v) for v in judge(images.float() / 255.0, labels)]


def _target_text(context, chosen: Sequence[Request]) -> str:
    names = context.dataset.domains
    targets = list(dict.fromkeys(target_of(r) for r in chosen))
    if targets == [None]:
        return "no domain condition"
    text = ", ".join(names[t] for t in targets if t is not None)
    if any(len(r.domains) > 1 for r in chosen):  # CDGA's interpolation: a mix drawn per image
        text += " (mixed with the source domain, a weight per image)"
    return text


def keep_preview(self, context, images: torch.Tensor, env: int | None, *, requests: Sequence[Request],
                 sampler, strength: float | None = None, stage: str = "base", target: str | None = None) -> None:
    """Keep the preview of one generation: ``images`` (made for training domain ``env``; None: shared by all)
    from ``requests`` with ``sampler``, img2img at ``strength`` or pure samples when it is None. A second
    call for the same stage and domain keeps the first. ``target``: how to name what the images were
    generated toward when the requests' domains do not say it (e.g. TGDP's density-ratio target)."""
    previews = getattr(context, "previews", None)
    if previews is None or not len(images) or not len(requests):
        return
    domain = context.dataset.domains[env] if env is not None else "all training domains"
    kept = [p for p in previews if (p.stage, p.domain) == (stage, domain)]
    if any(p.kind != "unknown" for p in kept):
        return
    previews[:] = [p for p in previews if not any(p is k for k in kept)]  # the fallback (no metadata) gives way
    idx = pick(requests, context.test_envs, bool(self.ORACLE))
    chosen = [requests[i] for i in idx]
    labels = torch.tensor([r.class_id for r in chosen], dtype=torch.long)
    shown = self.to_uint8(images[idx].cpu())
    img2img = strength is not None
    sources = quantize(torch.stack([r.source.cpu() for r in chosen])) if img2img else None
    held = set(context.test_envs)
    common = {"stage": stage, "domain": domain, "kind": "img2img" if img2img else "pure",
              "target": target or _target_text(context, chosen),
              "oracle_target": any(d in held for r in chosen for d in r.domains), "group": f"{stage}-{domain}",
              "sources": sources}
    shown_terms = [type(t).__name__ for t in sampler.guidance]
    # oracle-guided rows: (og label, images, term names) per guidance level; None images: the training ones
    variants = self.preview_variants(context, sampler, chosen, strength) or [(None, None, shown_terms)]
    for og, drawn, terms in variants:
        drawn = shown if drawn is None else self.to_uint8(drawn.cpu())
        previews.append(PreviewStrip(drawn, og=og, guidance=list(terms), valid=_judge(self, context, drawn, labels),
                                     **common))
