"""Reading a spec file: YAML (or JSON) with duplicate keys refused and ``1e-4`` read as a number."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from domainfusion_bench.errors import DfbenchError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (YAML would silently keep the last one) and reads
    ``1e-4`` as a number, as JSON and YAML 1.2 do (PyYAML's YAML 1.1 wants a dot: ``1.0e-4``)."""


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML (or JSON) the way specs are read: duplicate keys refused, ``1e-4`` a float."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_spec_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise DfbenchError(f"cannot read sweep spec {path}: {err.strerror}. Specs live in sweeps/*.yaml.") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise DfbenchError(f"{path}{where}: bad YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DfbenchError(f"{path}: a sweep spec is a mapping of key: value, got {type(raw).__name__}")
    return raw
