"""Oracle-assisted guidance ("Don't be so negative!", Naderiparizi et al., ICML 2024).

The paper's validity oracle O(x, y) in {0, 1}, here the validity judge J, says whether a generated sample is
acceptable; for augmentation it asks whether the sample still shows its intended class y (``ClassifierJudge``:
a classifier's probability of y is at least a threshold). Each round:

1. draw samples with the current (guided) sampler and label them with J;
2. train a **time-conditioned** validity classifier C(x_t, t[, y]) on noised copies
   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) n of a class-balanced valid/invalid set with the
   class-prior-weighted BCE  alpha * mean_valid(-log C) + (1 - alpha) * mean_invalid(-log(1 - C)),
   alpha = the valid fraction of this round's draw. Balancing gives the (often rare) invalid class
   enough examples; the weights undo the balancing, so the optimum is the calibrated posterior
   C*(x_t, t) = P(valid | x_t) under the current model, which is exactly the classifier-guidance
   factor that turns p(x) into p(x | valid). Without alpha the classifier is biased by
   log((1 - alpha) / alpha) and guidance over-pushes (fewer invalid samples, worse likelihood).
3. guide with eps - sqrt(1 - abar_t) * w * sum_k grad log C_k(x_t, t): rounds stack, each C_k
   correcting what the model guided by C_1..C_{k-1} still gets wrong.

Distillation (our choice, the paper leaves the form open): ONE validity classifier D(x_t, t[, y])
of the same architecture, trained to match the stack's summed log-probability
sum_k log C_k(x_t, t, y) (mean squared error on log D, targets floored at ``log_floor``) on noised
samples of every round's draw. Why a classifier and not an eps-correction network: guidance needs only
the gradient of a scalar, so a scalar network costs one forward+backward per step whatever K was, it
reuses the round classifiers' architecture and training loop, its output stays a probability (the
stack's P(valid)), and for images an eps-correction network would need an image-shaped output (a UNet)
for what is a one-number quantity. Matching log values (not soft-label BCE) weights errors where the
guidance acts: deep in the invalid region, where C is tiny and soft-label BCE would not care.

Sampling goes through the project's one guided-sampler path: the terms here are ``GuidanceTerm``s for
``samplers.DDIMSampler`` / ``guided_eps``. ``run_rounds`` drives the loop for any sampler: the caller
supplies ``draw(terms, name) -> (images, labels)``, so the same code serves a 2-D toy, CDGA's img2img
generation and any other generative method.
"""

from domainfusion_bench.diffusion.oracle_guidance.classifiers import (
    ImageValidityClassifier,
    WarmStartValidityClassifier,
    PointValidityClassifier,
    ValidityClassifier,
    timestep_embedding,
)
from domainfusion_bench.diffusion.oracle_guidance.distill import (
    DistillConfig,
    distill_stack,
)
from domainfusion_bench.diffusion.oracle_guidance.guidance import (
    ValidityGuidance,
    stack_terms,
)
from domainfusion_bench.diffusion.oracle_guidance.judge import (
    ClassifierJudge,
    Judge,
    check_threshold,
    invalid_rate,
)
from domainfusion_bench.diffusion.oracle_guidance.rounds import (
    Cached,
    Draw,
    OracleGuidanceResult,
    RoundRecord,
    run_rounds,
)
from domainfusion_bench.diffusion.oracle_guidance.training import (
    ClassifierTrainConfig,
    noised,
    prior_weighted_bce,
    train_validity_classifier,
)

__all__ = [
    "ImageValidityClassifier", "WarmStartValidityClassifier", "PointValidityClassifier", "ValidityClassifier", "timestep_embedding",
    "DistillConfig", "distill_stack", "ValidityGuidance", "stack_terms", "ClassifierJudge", "Judge",
    "check_threshold", "invalid_rate", "Cached", "Draw", "OracleGuidanceResult", "RoundRecord", "run_rounds",
    "ClassifierTrainConfig", "noised", "prior_weighted_bce", "train_validity_classifier",
]
