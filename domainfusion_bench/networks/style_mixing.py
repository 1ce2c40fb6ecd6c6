"""Style-mixing layers: MixStyle (Zhou et al., ICLR 2021) and EFDMix (Zhang et al., CVPR 2022).

One layer family, two statistics rules (DESIGN.md section 4). In training mode, with probability ``p``
per call, every sample is mixed with a partner from the same batch:

- ``mixstyle``: per sample and channel, mu = spatial mean and sigma = sqrt(unbiased spatial var + eps),
  both detached; ``out = (lam sigma + (1-lam) sigma_p) * (x - mu) / sigma + (lam mu + (1-lam) mu_p)``.
- ``efdm``: exact feature distribution matching. Sort each (sample, channel) vector of H*W values;
  each element takes the partner's sorted value at its own rank:
  ``out = x + (1-lam) * (partner_sorted[rank(x)] - detach(x))``. The forward value mixes, the gradient
  to x is the identity, and the partner's sorted values are not detached (gradient reaches the partner).

lam ~ Beta(alpha, alpha) per sample. Partners: ``random`` (a permutation of the batch) or
``crossdomain`` (half of domain i's samples pair with half of domain i+1's, cyclically, so no pair
comes from one domain; the caller says each sample's domain with :meth:`StyleMixing.for_domains`).
Every random draw (gate, partners, lam) comes from torch's global CPU generator, so the run's seed
controls it and the draws do not depend on the device. Eval mode is the identity.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from domainfusion_bench.errors import DfbenchError

RULES = ("mixstyle", "efdm")
MIX_MODES = ("random", "crossdomain")
EPS = 1e-6


def _per_sample(lam: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """lam as a [B, 1, 1] tensor (one value per sample) in x's dtype and device."""
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    return lam.reshape(-1, 1, 1).expand(x.shape[0], 1, 1)


def mixstyle_transfer(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor | float, eps: float = EPS) -> torch.Tensor:
    """MixStyle of ``x`` [B, C, *spatial] toward ``partner`` (same shape; usually ``x[perm]``).

    Statistics are computed in at least float32 (bf16/fp16 features are upcast) and detached; the result
    has x's dtype.
    """
    shape, dtype = x.shape, x.dtype
    work = torch.promote_types(dtype, torch.float32)
    xf = x.flatten(2).to(work)
    pf = partner.flatten(2).to(work)
    mu = xf.mean(-1, keepdim=True).detach()
    sigma = (xf.var(-1, keepdim=True) + eps).sqrt().detach()
    mu_p = pf.mean(-1, keepdim=True).detach()
    sigma_p = (pf.var(-1, keepdim=True) + eps).sqrt().detach()
    lam = _per_sample(lam, xf)
    x_hat = (xf - mu) / sigma
    out = (lam * sigma + (1 - lam) * sigma_p) * x_hat + (lam * mu + (1 - lam) * mu_p)
    return out.to(dtype).reshape(shape)


def efdm_transfer(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """EFDMix of ``x`` [B, C, *spatial] toward ``partner`` (same shape; usually ``x[perm]``).

    ``out = x + (1-lam) * (partner_sorted[rank(x)] - detach(x))``, written as
    ``lam * detach(x) + (1-lam) * partner_sorted[rank(x)] + (x - detach(x))``: the same value and the same
    gradients (identity to x, ``1-lam`` to the partner's values), and exact at lam = 0 and lam = 1
    (``x + (p - x)`` need not round to ``p`` in floating point; ``x - detach(x)`` is exactly 0).
    """
    shape = x.shape
    xv = x.flatten(2)
    pv = partner.flatten(2)
    order = torch.sort(xv.detach(), dim=-1, stable=True).indices  # order[k] = position of x's k-th smallest
    rank = order.argsort(dim=-1)  # rank[j] = rank of x's element j
    partner_sorted = torch.sort(pv, dim=-1, stable=True).values  # differentiable w.r.t. the partner
    matched = partner_sorted.gather(-1, rank)  # partner's value at each element's own rank
    lam = _per_sample(lam, xv)
    x_d = xv.detach()
    out = lam * x_d + (1 - lam) * matched + (xv - x_d)
    return out.reshape(shape)


TRANSFERS = {"mixstyle": mixstyle_transfer, "efdm": efdm_transfer}


def random_partners(n: int) -> torch.Tensor:
    """A random permutation of the batch (a sample may draw itself, as in MixStyle's ``random``)."""
    return torch.randperm(n)


def crossdomain_partners(domains: torch.Tensor) -> torch.Tensor:
    """Partner index of every sample such that no pair comes from one domain.

    The domains present (sorted) are a cycle d_0 .. d_{D-1}. Each domain's samples are shuffled and
    split into a first half F_i (floor) and a second half B_i; F_i pairs with B_{i+1}, both ways. With
    equal, even per-domain counts the pairing is mutual (partner[partner[a]] == a); otherwise the
    shorter side is cycled. With fewer than two domains present no such pairing exists, and the
    partners fall back to a random permutation.
    """
    domains = torch.as_tensor(domains).detach().cpu().long().flatten()
    n = len(domains)
    labels = torch.unique(domains)
    if len(labels) < 2:
        return random_partners(n)
    first, second = [], []
    for d in labels:
        idx = (domains == d).nonzero().flatten()
        idx = idx[torch.randperm(len(idx))]
        k = len(idx) // 2
        first.append(idx[:k])
        second.append(idx[k:])  # never empty: the domain is present
    partner = torch.empty(n, dtype=torch.long)
    count = len(labels)
    for i in range(count):
        f, b = first[i], second[(i + 1) % count]
        if len(f):
            partner[f] = b[torch.arange(len(f)) % len(b)]
        src = f if len(f) else second[i]  # a domain with one sample lends that sample
        partner[b] = src[torch.arange(len(b)) % len(src)]
    return partner


class StyleMixing(nn.Module):
    """MixStyle / EFDMix layer; identity in eval mode; one instance may be shared by several stages."""

    def __init__(self, rule: str = "mixstyle", p: float = 0.5, alpha: float = 0.1, mix: str = "crossdomain",
                 eps: float = EPS):
        super().__init__()
        if rule not in RULES:
            raise DfbenchError(f"unknown style-mixing rule {rule!r}. Choices: {', '.join(RULES)}")
        if mix not in MIX_MODES:
            raise DfbenchError(f"unknown mix mode {mix!r}. Choices: {', '.join(MIX_MODES)}")
        if not 0.0 <= p <= 1.0:
            raise DfbenchError(f"style-mixing probability p must be in [0, 1], got {p}")
        if not alpha > 0:
            raise DfbenchError(f"style-mixing alpha (Beta(alpha, alpha)) must be > 0, got {alpha}")
        self.rule, self.p, self.alpha, self.mix, self.eps = rule, float(p), float(alpha), mix, eps
        self._domains: torch.Tensor | None = None
        self.last_partners: torch.Tensor | None = None  # of the most recent applied call (for inspection)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, p={self.p}, alpha={self.alpha}, mix={self.mix}"

    @contextlib.contextmanager
    def for_domains(self, domains: torch.Tensor | None) -> Iterator[None]:
        """Within the block, sample k of every batch this layer sees comes from domain ``domains[k]``."""
        previous = self._domains
        self._domains = None if domains is None else torch.as_tensor(domains).detach().cpu().long().flatten()
        try:
            yield
        finally:
            self._domains = previous

    def partners(self, n: int) -> torch.Tensor:
        if self.mix == "random":
            return random_partners(n)
        if self._domains is None:
            raise DfbenchError(
                "StyleMixing(mix='crossdomain') needs each sample's domain: run the forward pass inside "
                "`with layer.for_domains(labels):`, or use mix='random'."
            )
        if len(self._domains) != n:
            raise DfbenchError(
                f"StyleMixing got {len(self._domains)} domain labels for a batch of {n} samples; "
                "label every sample of the concatenated batch."
            )
        return crossdomain_partners(self._domains)

    def sample_lambda(self, n: int) -> torch.Tensor:
        return torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha)).sample((n,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if torch.rand(()).item() >= self.p:  # applied with probability p per call
            return x
        n = x.shape[0]
        perm = self.partners(n)
        lam = self.sample_lambda(n)
        self.last_partners = perm
        perm = perm.to(x.device)
        kwargs = {"eps": self.eps} if self.rule == "mixstyle" else {}
        return TRANSFERS[self.rule](x, x[perm], lam.to(x.device), **kwargs)
