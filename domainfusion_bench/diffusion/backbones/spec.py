"""Parsing ``diffusion_backbone``-style strings into a ``BackboneSpec``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domainfusion_bench.errors import DfbenchError


@dataclass
class BackboneSpec:
    """Parsed ``diffusion_backbone``-style strings: ``pixel_ddpm``, ``sd:<folder or hub id>``, ``sd:tiny``."""

    kind: str
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "BackboneSpec":
        name, _, rest = text.partition(":")
        if name in ("pixel_ddpm", "ddpm"):
            return cls("pixel_ddpm")
        if name in ("sd", "stable_diffusion"):
            if not rest:
                raise DfbenchError("stable diffusion backbone needs a source: sd:<local folder or hub id> (or sd:tiny)")
            return cls("stable_diffusion", rest)
        raise DfbenchError(f"unknown diffusion backbone {text!r}. Choices: pixel_ddpm, sd:<folder or hub id>, sd:tiny")
