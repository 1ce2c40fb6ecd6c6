"""Probing time-step slices of z: which dims carry class and domain, by linear probes per stage."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from domainfusion_bench.diffusion.diti.schedule import STAGES


def stage_slices(end_dims: Sequence[int], num_timesteps: int, k: int, stages: Sequence[int] = STAGES,
                 reference: Sequence[int] = STAGES) -> list[dict[str, Any]]:
    """Per stage of time steps (``stages``: its edges on this schedule; ``reference``: the same edges as the
    reference's t, in ``ref``): the z slice that becomes visible there (the dims of the blocks whose first
    time step lies in the stage), then the prefixes (all that is visible by each stage's end), then all of z."""
    first_t = [-(-b * num_timesteps // k) for b in range(k)]  # ceil(b T / k): block b's first time step
    rows, lo_t, lo_ref = [], 0, 0
    for hi_t, hi_ref in zip(stages, reference):
        members = [b for b in range(k) if lo_t <= first_t[b] < hi_t]
        if members:
            b0, b1 = members[0], members[-1]
            rows.append({"slice": f"t {lo_t}-{hi_t}", "ref": f"{lo_ref}-{hi_ref}", "blocks": f"{b0}-{b1}",
                         "dims": (end_dims[b0 - 1] if b0 else 0, end_dims[b1])})
        lo_t, lo_ref = hi_t, hi_ref
    prefixes = [{"slice": f"t < {r['slice'].split('-')[1]} (prefix)", "ref": f"< {r['ref'].split('-')[1]}",
                 "blocks": f"0-{r['blocks'].split('-')[1]}", "dims": (0, r["dims"][1])} for r in rows[1:-1]]
    return rows + prefixes + [{"slice": "all", "ref": "all", "blocks": f"0-{k - 1}", "dims": (0, end_dims[-1])}]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 seed: int = 0) -> float:
    """Accuracy on (test_x, test_y) of a logistic regression fitted on standardised train_x."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if train_x.shape[1] == 0 or len(set(train_y.tolist())) < 2:
        return float("nan")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(train_x.double().numpy(), train_y.numpy())
    return float((model.predict(test_x.double().numpy()) == test_y.numpy()).mean())


def probe_slices(z_fit: torch.Tensor, y_fit: torch.Tensor, d_fit: torch.Tensor, z_eval: torch.Tensor,
                 y_eval: torch.Tensor, d_eval: torch.Tensor, slices: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Class and domain accuracy of linear probes on each z slice (fit on one set, scored on another)."""
    out = []
    for s in slices:
        a, b = s["dims"]
        out.append({**s, "dims": f"{a}-{b}", "n_dims": b - a,
                    "class_acc": linear_probe(z_fit[:, a:b], y_fit, z_eval[:, a:b], y_eval),
                    "domain_acc": linear_probe(z_fit[:, a:b], d_fit, z_eval[:, a:b], d_eval)})
    return out


def format_probe_table(rows: Sequence[dict[str, Any]], n_classes: int, n_domains: int) -> str:
    head = f"{'slice':<22} {'ref t':>9} {'blocks':>7} {'dims':>9} {'class acc':>10} {'domain acc':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['slice']:<22} {r['ref']:>9} {r['blocks']:>7} {r['dims']:>9} {r['class_acc']:>10.3f} "
                     f"{r['domain_acc']:>11.3f}")
    lines.append("(ref t: the stage's time steps on the reference's linear schedule, matched by alpha-bar)")
    lines.append(f"(chance: class {1 / n_classes:.3f}, domain {1 / max(n_domains, 1):.3f})")
    return "\n".join(lines)
