"""The rounds of oracle-assisted guidance around any sampler, with the optional distillation at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from domainfusion_bench.diffusion.oracle_guidance.classifiers import ValidityClassifier
from domainfusion_bench.diffusion.oracle_guidance.distill import DistillConfig, distill_stack
from domainfusion_bench.diffusion.oracle_guidance.guidance import ValidityGuidance, stack_terms
from domainfusion_bench.diffusion.oracle_guidance.judge import Judge
from domainfusion_bench.diffusion.oracle_guidance.training import ClassifierTrainConfig, train_validity_classifier
from domainfusion_bench.diffusion.samplers import GuidanceTerm
from domainfusion_bench.errors import DfbenchError


@dataclass
class RoundRecord:
    name: str  # what was measured: base, round1, ..., distilled
    n_samples: int
    n_invalid: int

    @property
    def invalid_rate(self) -> float:
        return self.n_invalid / max(1, self.n_samples)


@dataclass
class OracleGuidanceResult:
    classifiers: list[ValidityClassifier]
    distilled: ValidityClassifier | None
    records: list[RoundRecord]
    weight: float
    infos: list[dict[str, Any]] = field(default_factory=list)  # what each trained network reported
    samples_drawn: int = 0  # drawn in this call (cached rounds draw nothing)

    def stack(self, name: str = "og") -> list[GuidanceTerm]:
        return stack_terms(self.classifiers, self.weight, name)

    def terms(self, name: str = "og") -> list[GuidanceTerm]:
        """What a generation stage should guide with: the distilled network if any, else the stack."""
        if self.distilled is not None:
            return [ValidityGuidance(self.distilled, self.weight, f"{name}-distilled")]
        return self.stack(name)

    def rates(self) -> dict[str, float]:
        return {r.name: r.invalid_rate for r in self.records}


Draw = Callable[[Sequence[GuidanceTerm], str], tuple[torch.Tensor, torch.Tensor]]
# cached(kind, index, build, train) -> (trained module, info): where an algorithm puts its model store
Cached = Callable[[str, int, Callable[[], ValidityClassifier], Callable[[ValidityClassifier], dict]], tuple[ValidityClassifier, dict]]


def _uncached(kind, index, build, train):
    module = build()
    return module, train(module)


def counterfactual_pairs(images: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor, judge: Judge,
                         num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every drawn image paired with every class y, each pair judged by the validity judge: (x0, y, J(x, y)).

    A class-conditional judge answers for any intended class, so one draw of N images gives N x K
    labelled pairs: the pairs with another class are (mostly) invalid ones, which a draw that is 97%
    valid cannot supply (5 invalid images in 256 leave C at the prior, with no gradient to guide by)."""
    n = len(images)
    classes = torch.arange(num_classes).repeat_interleave(n)
    valid = torch.as_tensor(judge(images.repeat(num_classes, *[1] * (images.dim() - 1)), classes), dtype=torch.bool)
    return x0.repeat(num_classes, *[1] * (x0.dim() - 1)), classes, valid.cpu()


def run_rounds(draw: Draw, judge: Judge, encode: Callable[[torch.Tensor], torch.Tensor],
               new_classifier: Callable[[int], ValidityClassifier], rounds: int, weight: float = 1.0, *,
               alphas_cumprod: torch.Tensor, train_config: ClassifierTrainConfig = ClassifierTrainConfig(),
               distill: bool = False, distill_config: DistillConfig = DistillConfig(), measure_last: bool = True,
               cached: Cached = _uncached, heartbeat: Callable[[], None] | None = None,
               name: str = "og", counterfactual: bool = False) -> OracleGuidanceResult:
    """Rounds of oracle-assisted guidance around any sampler.

    ``draw(terms, name) -> (images, labels)`` samples with the guidance ``terms``; ``judge(images,
    labels)`` labels validity; ``encode(images)`` maps them to the denoiser space where C works;
    ``new_classifier(k)`` builds an untrained network (k = 0: the distilled one).

    Round k = 1..rounds draws with the stack C_1..C_{k-1} (its invalid rate is recorded as "base" for
    k = 1, else "round{k-1}"), then trains C_k on that draw. With ``distill``, one more draw measures the
    full stack ("round{rounds}") and, with the base draw, is the distillation data; the distilled network
    is then measured ("distilled"). Without ``distill``, ``measure_last`` draws once more to measure the
    full stack (an algorithm can skip it: its own generation measures that).

    Each trained network goes through ``cached(kind, k, build, train)`` ("round" or "distilled"): the draw
    happens inside ``train``, so a cached network costs no sampling, and its ``info`` carries the
    measurements (``n_samples``/``n_invalid`` per measured name) that make the records.

    ``counterfactual`` (class-conditional classifiers only): train and distil on every (image, class) pair
    the judge labelled (``counterfactual_pairs``), with alpha still the draw's own valid fraction; the
    records always count the draw's intended classes.
    """
    if rounds < 0:
        raise DfbenchError(f"oracle guidance rounds must be >= 0, got {rounds}")
    classifiers: list[ValidityClassifier] = []
    records: list[RoundRecord] = []
    infos: list[dict[str, Any]] = []
    pool: dict[str, tuple] = {}  # label -> (encoded draw, labels, images), only what was drawn in this call
    drawn = 0

    def measure(terms, label) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal drawn
        images, labels = draw(terms, label)
        valid = torch.as_tensor(judge(images, labels), dtype=torch.bool).cpu()
        drawn += len(images)
        x0 = encode(images).detach().float().cpu()
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        pool[label] = (x0, labels, images)
        return x0, labels, valid

    def training_set(label, x0, labels, valid, num_classes):
        """What a classifier learns from: the draw, or all its (image, class) pairs (``counterfactual``)."""
        if not (counterfactual and num_classes):
            return x0, labels, valid
        return counterfactual_pairs(pool[label][2], x0, labels, judge, num_classes)

    def counts(label, valid) -> dict[str, Any]:
        return {"measured": {label: {"n_samples": len(valid), "n_invalid": int((~valid).sum())}}}

    def add_records(info):
        for label, c in info.get("measured", {}).items():
            records.append(RoundRecord(label, int(c["n_samples"]), int(c["n_invalid"])))

    for k in range(1, rounds + 1):
        label = "base" if k == 1 else f"round{k - 1}"
        stack = stack_terms(classifiers, weight, name)

        def train_round(c, stack=stack, label=label, k=k):
            x0, labels, valid = measure(stack, label)
            info = counts(label, valid)
            if valid.all() or not valid.any():
                # nothing to learn: all valid (nothing left to fix) or none valid (no direction)
                return {**info, "skipped": "all valid" if valid.all() else "none valid"}
            cfg = ClassifierTrainConfig(**{**train_config.to_json(), "seed": train_config.seed + k})
            alpha = float(valid.float().mean())  # the sampler's valid fraction, whatever the pairs are
            tx, ty, tv = training_set(label, x0, labels, valid, c.num_classes)
            return {**info, **train_validity_classifier(c, tx, tv, ty if c.num_classes else None,
                                                        alphas_cumprod, cfg, alpha=alpha, heartbeat=heartbeat),
                    "n_pairs": len(tv), "n_invalid_pairs": int((~tv).sum())}

        c, info = cached("round", k, lambda k=k: new_classifier(k), train_round)
        infos.append(info)
        add_records(info)
        if info.get("skipped"):
            break
        classifiers.append(c)

    last = "base" if not classifiers else f"round{len(classifiers)}"
    distilled = None
    if distill and classifiers:
        def train_distilled(student):
            x_last, y_last, valid = measure(stack_terms(classifiers, weight, name), last)
            info = counts(last, valid)
            if "base" not in pool:  # round 1 came from a cache: draw the unguided samples again
                measure([], "base")
            parts = [training_set(lab, pool[lab][0], pool[lab][1], None, student.num_classes) for lab in ("base", last)]
            x0 = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts]) if student.num_classes else None
            info.update(distill_stack(student, classifiers, x0, y, alphas_cumprod, distill_config, heartbeat))
            _, _, valid_d = measure([ValidityGuidance(student, weight, f"{name}-distilled")], "distilled")
            info["measured"].update(counts("distilled", valid_d)["measured"])
            return info

        distilled, info = cached("distilled", len(classifiers), lambda: new_classifier(0), train_distilled)
        infos.append(info)
        add_records(info)
    elif measure_last and (not records or records[-1].name != last):
        _, _, valid = measure(stack_terms(classifiers, weight, name), last)
        add_records(counts(last, valid))
    return OracleGuidanceResult(classifiers, distilled, records, weight, infos, drawn)
