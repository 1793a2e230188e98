"""Reading YAML files at the boundary: one-line errors that name the file and the field.

Every file either side reads (an experiment, a policy, a node's configuration, a study) goes
through `read_yaml_mapping`: bounded aliases, a mapping at the top, the file and line of a
syntax error. The schemas live with the side that owns them; `first_error` turns a
validation error into one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from securefpt.errors import ConfigError


def error_location(exc: ValidationError) -> tuple[str, str]:
    """The dotted field of a validation error's first problem, and its one-line message. A setting
    of another PEFT method than the one chosen is named as such (the method is a tagged union)."""
    from securefpt.protocol.request import PEFT_METHODS

    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    if err["type"] == "union_tag_invalid":  # a PEFT method that does not exist
        loc.append("method")
        msg = f"{err['ctx']['tag']!r} is not one of {err['ctx']['expected_tags']}"
    for i in range(len(loc) - 1):
        if loc[i] == "peft" and loc[i + 1] in PEFT_METHODS:
            method = loc.pop(i + 1)
            if err["type"] == "extra_forbidden":
                msg = f"not a setting of peft.method={method}"
            break
    return ".".join(loc), msg.removeprefix("Value error, ")


def first_error(exc: ValidationError) -> str:
    """`dotted.field: message` of a validation error (one line, the first problem)."""
    loc, msg = error_location(exc)
    more = len(exc.errors()) - 1
    return f"{loc or '(top level)'}: {msg}" + (f" (and {more} more)" if more > 0 else "")


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
