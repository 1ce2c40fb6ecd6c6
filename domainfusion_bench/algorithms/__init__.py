"""Algorithms: importing this package registers the built-in ones; plugins register themselves."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Iterable

from domainfusion_bench.algorithms import erm  # noqa: F401  (registers ERM)
from domainfusion_bench.algorithms import cdga  # noqa: F401  (registers CDGA, CDGA*)
from domainfusion_bench.algorithms import diti  # noqa: F401  (registers DiTi)
from domainfusion_bench.algorithms import style_mixing  # noqa: F401  (registers MixStyle, EFDM)
from domainfusion_bench.algorithms import oracle_guidance  # noqa: F401  (registers CDGA+OG, DomainFusion+OG, TGDP+OG)
from domainfusion_bench.algorithms import domainfusion  # noqa: F401  (registers DomainFusion and its ablations)
from domainfusion_bench.algorithms import tgdp  # noqa: F401  (registers TGDP, TGDP-FS)
from domainfusion_bench.algorithms.base import ALGORITHMS, Algorithm, register_algorithm
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.hparams import HParamSpace, base_space


def load_plugins(paths: Iterable[str | Path]) -> None:
    """Import researcher files that register algorithms (or datasets) with the decorators."""
    for path in paths:
        path = Path(path).resolve()
        if not path.is_file():
            raise DfbenchError(f"plugin file {path} does not exist (--plugins takes paths to .py files)")
        name = f"dfbench_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise DfbenchError(f"plugin {path} failed to import: {type(err).__name__}: {err}") from err


def algorithm_space(algorithm: str, dataset_cls: type) -> HParamSpace:
    """The shared space for the dataset plus what the algorithm declares (subclasses call super)."""
    space = base_space(dataset_cls)
    ALGORITHMS.get(algorithm).hparam_space(space, dataset_cls)
    return space


__all__ = ["ALGORITHMS", "Algorithm", "register_algorithm", "load_plugins", "algorithm_space"]
