"""Domain names of a run's datasets: from its splits.json, or DomainBed's own labels."""

from __future__ import annotations

import os
import re

from domainfusion_bench import runfiles


def _splits_domains(run_dir: str, seen: dict[bytes, tuple[str, ...] | None]) -> list[str] | None:
    """Domain names from a run's splits.json; ``seen`` remembers small files by their text (the runs of a
    sweep share one text per trial)."""
    try:
        with open(os.path.join(run_dir, runfiles.SPLITS), "rb", buffering=0) as f:
            text = f.readall()
    except OSError:  # missing (DomainBed's run dirs) or unreadable
        return None
    if text in seen:
        names = seen[text]
    else:
        names = _parse_splits_domains(text)
        if len(text) < 1 << 16:  # not an old run's splits.json with every index
            seen[text] = names
    return None if names is None else list(names)


def _parse_splits_domains(text: bytes) -> tuple[str, ...] | None:
    try:
        data = runfiles.loads(text)
    except ValueError:  # not JSON
        return None
    if not isinstance(data, dict):
        return None
    names = {}
    for key, value in data.items():
        m = re.fullmatch(r"env(\d+)", key)
        if m and isinstance(value, dict) and isinstance(value.get("domain"), str):
            names[int(m.group(1))] = value["domain"]
    if not names or sorted(names) != list(range(len(names))):
        return None
    return tuple(names[i] for i in range(len(names)))


# DomainBed's own environment labels (its datasets.py ENVIRONMENTS), for DomainBed run dirs: they have no
# splits.json, and their tables should read as DomainBed prints them. Kept here, not taken from the
# dataset registry, so collecting never imports torch.
DOMAINBED_ENVIRONMENTS = {
    "ColoredMNIST": ["+90%", "+80%", "-90%"],
    "RotatedMNIST": ["0", "15", "30", "45", "60", "75"],
    "VLCS": ["C", "L", "S", "V"],
    "PACS": ["A", "C", "P", "S"],
    "OfficeHome": ["A", "C", "P", "R"],
    "TerraIncognita": ["L100", "L38", "L43", "L46"],
    "DomainNet": ["clip", "info", "paint", "quick", "real", "sketch"],
}
