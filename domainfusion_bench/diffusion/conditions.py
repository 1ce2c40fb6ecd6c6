"""What a denoiser is conditioned on, and the guard that keeps held-out domains out of it.

A ``Condition`` is backbone-neutral: class ids, a weight vector over the dataset's domains (a one-hot row
for one domain, a convex mix for interpolation, all zeros for "no domain"), optional prompts, and what a
backbone precomputes from them (text-encoder states) or adds to them (an extra embedding, e.g. DiTi
features). Backbones build conditions with ``Backbone.condition(...)``, which runs the leakage guard.

The ``LeakageGuard`` knows the held-out domains of a run. Anything that would train on, condition on or
start from one of them raises ``DfbenchError``; only oracle variants (``allow_condition=True``) may
condition on a held-out domain, and nothing may train on or start from one. Raw text (prompts) that
names a held-out domain or quotes its description is refused like a condition on it. The one labelled
exception is the few-shot-target track (``few_shot_target=k``): up to k *unlabelled* held-out images may
be used (``check_target_images``), recorded in ``describe()``; everything else is still refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import torch

from domainfusion_bench.errors import DfbenchError

# Per-dataset text for each domain, used by text-conditioned backbones ("a {class}, {description}").
DOMAIN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "PACS": {"art_painting": "an art painting", "cartoon": "a cartoon", "photo": "a photo", "sketch": "a sketch"},
    "VLCS": {
        "Caltech101": "a centred object photo from Caltech101",
        "LabelMe": "a photo of a street or indoor scene",
        "SUN09": "a photo of a cluttered scene",
        "VOC2007": "an everyday photo from PASCAL VOC",
    },
    "OfficeHome": {
        "Art": "an artistic painting or drawing",
        "Clipart": "a clipart image",
        "Product": "a product photo on a white background",
        "Real World": "a real-world photo taken with a camera",
    },
    "TerraIncognita": {
        "location_100": "a camera-trap photo at location 100",
        "location_38": "a camera-trap photo at location 38",
        "location_43": "a camera-trap photo at location 43",
        "location_46": "a camera-trap photo at location 46",
    },
    "DomainNet": {
        "clipart": "a clipart image",
        "infograph": "an infographic",
        "painting": "a painting",
        "quickdraw": "a quick black-and-white doodle",
        "real": "a photo",
        "sketch": "a pencil sketch",
    },
    "DigitStyles": {
        "poster": "flat-colour filled strokes, light on dark or dark on light",
        "crayon": "dark strokes hatched in two colours on grainy paper",
        "stencil": "an outline on a ground with wide soft stripes",
        "chalk": "grainy light strokes on a speckled dark board",
    },
    "DigitStyles-v1": {
        "plain": "grey strokes on a black background",
        "inverted": "dark strokes on a coloured background",
        "painted": "strokes painted with a striped texture on paper",
        "sketch": "a pencil outline on white paper",
    },
    "RotatedDigits": {d: f"rotated by {d} degrees" for d in ("0", "15", "30", "45", "60", "75")},
    "RotatedMNIST": {d: f"rotated by {d} degrees" for d in ("0", "15", "30", "45", "60", "75")},
    "ColoredMNIST": {"+90%": "coloured mostly by label", "+80%": "coloured often by label", "-90%": "coloured against the label"},
}

# How a class name reads in a prompt, per dataset (default: the class folder name, underscores as spaces).
CLASS_TEMPLATES: dict[str, str] = {
    "DigitStyles": "handwritten digit {}",
    "DigitStyles-v1": "handwritten digit {}",
    "RotatedDigits": "handwritten digit {}",
    "RotatedMNIST": "handwritten digit {}",
}


def domain_description(dataset: str, domain: str) -> str:
    return DOMAIN_DESCRIPTIONS.get(dataset, {}).get(domain, domain.replace("_", " "))


def class_phrase(dataset: str, class_name: str) -> str:
    return CLASS_TEMPLATES.get(dataset, "{}").format(class_name.replace("_", " "))


class LeakageGuard:
    """The held-out domains of one run, and the checks every generative step goes through."""

    def __init__(self, dataset: str, domains: Sequence[str], held_out: Iterable[int] = (), allow_condition: bool = False,
                 few_shot_target: int = 0, oracle_out_split: bool = False):
        self.dataset = dataset
        self.domains = list(domains)
        self.held_out = frozenset(int(d) for d in held_out)
        self.allow_condition = allow_condition  # oracle variants only (e.g. CDGA*)
        if oracle_out_split and not allow_condition:
            raise DfbenchError("leakage guard: only an oracle variant (allow_condition) may use held-out out-splits")
        # oracle variants only: a model may have seen the held-out domains' out-splits (the images oracle model
        # selection validates on), never their in-splits (where test accuracy is read); see check_out_split
        self.oracle_out_split = oracle_out_split
        if int(few_shot_target) < 0:
            raise DfbenchError(f"few_shot_target must be >= 0 (0 = no held-out images at all), got {few_shot_target}")
        self.few_shot_target = int(few_shot_target)  # TGDP's few-shot track: k unlabelled held-out images
        self.target_images_used = 0

    def _names(self, indices: Iterable[int]) -> str:
        return ", ".join(f"{self.domains[i]!r} (index {i})" for i in sorted(indices))

    def _fail(self, what: str, indices: Iterable[int], hint: str = "") -> None:
        raise DfbenchError(
            f"leakage guard: refusing to {what} held-out domain {self._names(indices)} of {self.dataset} "
            f"(held out: {sorted(self.held_out)}).{hint}"
        )

    def check_train(self, envs: Iterable[int]) -> None:
        bad = self.held_out & {int(e) for e in envs}
        if bad:
            self._fail("train a diffusion model on", bad, " Diffusion models train on the training domains only.")

    def check_sources(self, envs: Iterable[int]) -> None:
        bad = self.held_out & {int(e) for e in envs}
        if bad:
            self._fail("generate from images of", bad, " Generation may start only from training-domain in-splits.")

    def check_condition(self, domain_weights: torch.Tensor) -> None:
        if self.allow_condition or not self.held_out:
            return
        used = {int(i) for i in (domain_weights.detach().abs().sum(0) > 0).nonzero().flatten().tolist()}
        bad = self.held_out & used
        if bad:
            self._fail("condition on", bad, " Only oracle variants (e.g. CDGA*) may condition on a held-out domain.")

    def check_seen(self, seen: Iterable[int], what: str) -> None:
        """``what`` (a backbone, a cache entry) was made with data of the domains ``seen``."""
        bad = self.held_out & {int(e) for e in seen}
        if bad and not self.oracle_out_split:
            self._fail(f"use {what}, which saw", bad, " It was made with that domain's data; use one made without it.")

    def held_out_phrases(self) -> dict[int, list[str]]:
        """Per held-out domain, the texts that name it: its name (with '_' as ' '; purely numeric names such
        as RotatedMNIST's '15' are too ambiguous in a prompt and are covered by their description) and its
        description from DOMAIN_DESCRIPTIONS."""
        out = {}
        for d in sorted(self.held_out):
            name = self.domains[d]
            phrases = {p for p in (name, name.replace("_", " ")) if re.search("[a-zA-Z]", p)}
            if self.dataset in DOMAIN_DESCRIPTIONS and name in DOMAIN_DESCRIPTIONS[self.dataset]:
                phrases.add(DOMAIN_DESCRIPTIONS[self.dataset][name])
            out[d] = sorted(phrases)
        return out

    def check_text(self, texts: Iterable[str | None], what: str = "a prompt") -> None:
        """Refuse text naming a held-out domain (case-insensitive, whole words); oracle variants may."""
        if self.allow_condition or not self.held_out:
            return
        phrases = self.held_out_phrases()
        for text in texts:
            if not text:
                continue
            for d, names in phrases.items():
                for name in names:
                    if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, flags=re.IGNORECASE):
                        raise DfbenchError(
                            f"leakage guard: {what} names held-out domain {self._names([d])} of {self.dataset}: "
                            f"{text!r} contains {name!r}. Prompts may describe training domains only "
                            "(only oracle variants may condition on a held-out domain)."
                        )

    def check_out_split(self, env: int, indices: Iterable[int], out_split: Iterable[int]) -> None:
        """An oracle model is about to train on ``indices`` of held-out domain ``env``: all must be in its
        out-split (``out_split``, this trial's), none in the in-split that the run's test accuracy reads."""
        if not self.oracle_out_split:
            self._fail("train on images of", [env], " Only oracle variants may see a held-out out-split.")
        stray = set(int(i) for i in indices) - set(int(i) for i in out_split)
        if stray:
            self._fail(f"train an oracle model on {len(stray)} in-split images of", [env],
                       " An oracle model may see a held-out domain's out-split only.")

    def check_target_images(self, n_images: int, labelled: bool) -> None:
        """Allow ``n_images`` more held-out images for the explicit few-shot-target track: unlabelled only,
        at most ``few_shot_target`` in all over this guard's life. Anything else is refused."""
        if not self.held_out:
            raise DfbenchError("check_target_images: this run holds out no domain; there is no target to take images from")
        if self.few_shot_target <= 0:
            self._fail("use images of", self.held_out,
                       " Only the few-shot-target track (few_shot_target=k) may see k unlabelled held-out images.")
        if labelled:
            self._fail("use labels of", self.held_out,
                       f" The few-shot-target track (k={self.few_shot_target}) allows unlabelled images only.")
        if n_images < 0 or self.target_images_used + n_images > self.few_shot_target:
            raise DfbenchError(
                f"leakage guard: {self.target_images_used} + {n_images} held-out images exceeds the few-shot-target "
                f"budget k={self.few_shot_target} for {self.dataset} (held out: {sorted(self.held_out)})."
            )
        self.target_images_used += int(n_images)

    def describe(self) -> dict[str, Any]:
        out = {"held_out": sorted(self.held_out), "oracle": self.allow_condition}
        if self.oracle_out_split:
            out["oracle_out_split"] = True
        if self.few_shot_target:
            out.update(few_shot_target=self.few_shot_target, target_images_used=self.target_images_used)
        return out


def domain_weights(spec: Any, batch: int, n_domains: int) -> torch.Tensor:
    """[batch, n_domains] weights from: None (no domain), an int, a LongTensor [B], a FloatTensor
    [B, n_domains] of weights, or a sequence with one entry per row: an int (that domain), a
    {domain index: weight} dict (a mix; {} = no domain) or None (no domain)."""
    if spec is None:
        return torch.zeros(batch, n_domains)
    if isinstance(spec, int):
        spec = [spec] * batch
    if isinstance(spec, torch.Tensor) and spec.dtype.is_floating_point:
        if spec.shape != (batch, n_domains):
            raise DfbenchError(f"domain weights must have shape {(batch, n_domains)}, got {tuple(spec.shape)}")
        weights = spec.detach().float().cpu()
    else:
        rows = spec.flatten().tolist() if isinstance(spec, torch.Tensor) else list(spec)
        if len(rows) != batch:
            raise DfbenchError(f"got {len(rows)} domain conditions for a batch of {batch}")
        weights = torch.zeros(batch, n_domains)
        for row, entry in enumerate(rows):
            mixture = {} if entry is None else entry if isinstance(entry, Mapping) else {entry: 1.0}
            for d, w in mixture.items():
                if not 0 <= int(d) < n_domains:
                    raise DfbenchError(f"domain ids must be in 0..{n_domains - 1}, got {d}")
                weights[row, int(d)] += float(w)
    if (weights < 0).any() or (weights.sum(1) > 1 + 1e-5).any():
        raise DfbenchError("domain weights must be non-negative and sum to at most 1 per row (0 = no domain)")
    return weights


def mix(n_domains: int, source: int, target: int, amount: float) -> dict[int, float]:
    """Interpolated domain condition: ``amount`` of the way from ``source`` to ``target``."""
    if source == target or amount >= 1.0:
        return {target: 1.0}
    if amount <= 0.0:
        return {source: 1.0}
    return {source: 1.0 - amount, target: amount}


@dataclass
class Condition:
    """A batch of conditions. ``class_ids`` -1 and an all-zero weight row mean "unconditional"."""

    class_ids: torch.Tensor  # [B] long
    domain_weights: torch.Tensor  # [B, n_domains] float
    prompts: list[str] | None = None
    embedding: torch.Tensor | None = None  # backbone-made (e.g. text-encoder hidden states [B, L, D])
    extra: torch.Tensor | None = None  # optional extra conditioning vector [B, E] (added by backbones that support it)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.class_ids)

    def select(self, index) -> "Condition":
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[index.to(t.device)]
        prompts = None if self.prompts is None else [self.prompts[i] for i in index.tolist()]
        return replace(self, class_ids=pick(self.class_ids), domain_weights=pick(self.domain_weights),
                       prompts=prompts, embedding=pick(self.embedding), extra=pick(self.extra))

    @staticmethod
    def cat(conditions: Sequence["Condition"]) -> "Condition":
        def cat(name):
            parts = [getattr(c, name) for c in conditions]
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise ValueError(f"cannot concatenate conditions where only some have {name}")
            return torch.cat(parts)

        prompts = None if any(c.prompts is None for c in conditions) else sum((c.prompts for c in conditions), [])
        return Condition(cat("class_ids"), cat("domain_weights"), prompts, cat("embedding"), cat("extra"),
                         dict(conditions[0].meta))

    def to(self, device) -> "Condition":
        move = lambda t: None if t is None else t.to(device)
        return replace(self, class_ids=move(self.class_ids), domain_weights=move(self.domain_weights),
                       embedding=move(self.embedding), extra=move(self.extra))

    def domains_used(self) -> set[int]:
        return {int(i) for i in (self.domain_weights.abs().sum(0) > 0).nonzero().flatten().tolist()}

    def describe(self, i: int, domains: Sequence[str] | None = None, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able description of row ``i`` (for manifests and cache keys)."""
        y = int(self.class_ids[i])
        w = self.domain_weights[i]
        mixd = {int(d): round(float(w[d]), 6) for d in (w != 0).nonzero().flatten().tolist()}
        out: dict[str, Any] = {"class": y, "domains": mixd}
        if classes is not None and y >= 0:
            out["class_name"] = classes[y]
        if domains is not None:
            out["domain_names"] = {domains[d]: v for d, v in mixd.items()}
        if self.prompts is not None:
            out["prompt"] = self.prompts[i]
        if self.extra is not None:
            out["extra_sha"] = _tensor_digest(self.extra[i])
        return out


def _tensor_digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
