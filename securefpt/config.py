"""Loading YAML files at the boundary: one-line errors that name the file and the field.

The schemas live where their side needs them (protocol/experiment.py, protocol/policy.py,
node/config.py); this module reads a file, applies `--set` overrides and turns a
validation error into one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from securefpt.errors import ConfigError
from securefpt.protocol.experiment import ExperimentConfig


def first_error(exc: ValidationError) -> str:
    """`dotted.field: message` of a validation error (one line, the first problem)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    msg = msg.removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    return f"{loc}: {msg}" + (f" (and {more} more)" if more > 0 else "")


MAX_YAML_NODES = 100_000  # what a document may expand to once its aliases are followed


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a document whose aliases expand past MAX_YAML_NODES (an
    "alias bomb": a few hundred bytes that expand to billions of nodes when anything walks them)."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"aliases expand to more than {MAX_YAML_NODES:,} nodes")
        return node


def _expanded_size(node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes in the document once every alias is expanded (each shared node's size computed once)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.YAMLError("a recursive alias")
    open_nodes.add(key)
    children = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_NODES:
            break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def safe_load(text: str) -> Any:
    """`yaml.safe_load` with the alias bound above."""
    return yaml.load(text, Loader=_BoundedLoader)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        loaded = safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        reason = "" if mark is not None else f": {exc}"
        raise ConfigError(f"{path}: malformed YAML{line}{reason}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return loaded


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (numbers, bools, lists), else keep the string."""
    try:
        return safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides to a raw config mapping (a copy)."""
    data = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load and validate an experiment YAML (or the defaults when `path` is None).

    Relative paths inside the file (data.root, policy) are resolved against the
    file's folder, so a config works from any working directory.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        where = str(path)
        raw = read_yaml_mapping(path)
        base = path.resolve().parent
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        loc = ".".join(str(p) for p in exc.errors()[0]["loc"])
        given = [o.split("=", 1)[0].strip() for o in overrides or []]
        if any(loc == key or loc.startswith(key + ".") for key in given):  # the mistake is in a --set
            where = "--set"
        raise ConfigError(f"{where}: {first_error(exc)}") from None
    return _resolve_paths(cfg, base)


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    updates: dict[str, Any] = {}
    if cfg.data.root is not None and not cfg.data.root.is_absolute():
        updates["data"] = cfg.data.model_copy(update={"root": (base / cfg.data.root).resolve()})
    for key in ("policy", "clients", "server_key"):
        value = getattr(cfg, key)
        if value is not None and not value.is_absolute():
            updates[key] = (base / value).resolve()
    return cfg.model_copy(update=updates) if updates else cfg
