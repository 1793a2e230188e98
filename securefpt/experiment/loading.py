"""Reading an operator's experiment file: the YAML, `--set` overrides, relative paths.

One-line errors name the file (or `--set`) and the field; a run is then resolved from the
validated `ExperimentConfig` alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from securefpt.errors import ConfigError
from securefpt.experiment.config import ExperimentConfig
from securefpt.protocol.request import PEFT_CLASSES
from securefpt.protocol.yaml_files import error_location, first_error, read_yaml_mapping, safe_load


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


def switch_peft_method(raw: dict[str, Any], overrides: list[str], before: Any = None) -> dict[str, Any]:
    """`--set peft.method=M` switches a file's PEFT section to M: the file's method's own settings that M
    has not (a prompt length for LoRA) are dropped; any other key stays, so a misspelt one is still refused.
    A file itself must name only its method's settings, as PEFT's configs do. `before`: the method the
    file named (prompt tuning where it named none)."""
    switched = [o for o in overrides if o.split("=", 1)[0].strip() == "peft.method"]
    peft = raw.get("peft")
    if not switched or not isinstance(peft, dict):
        return raw
    method, old = peft.get("method"), before or "prompt_tuning"
    if method not in PEFT_CLASSES or old not in PEFT_CLASSES or old == method:
        return raw
    stale = set(PEFT_CLASSES[old].model_fields) - set(PEFT_CLASSES[method].model_fields)
    return {**raw, "peft": {k: v for k, v in peft.items() if k not in stale}}


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
    before = raw.get("peft", {}).get("method") if isinstance(raw.get("peft"), dict) else None
    raw = switch_peft_method(apply_overrides(raw, overrides or []), overrides or [], before)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        loc, _ = error_location(exc)
        given = [o.split("=", 1)[0].strip() for o in overrides or []]
        if any(loc == key or loc.startswith(key + ".") or key.startswith(loc + ".") for key in given):  # a --set
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
