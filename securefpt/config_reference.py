"""The experiment file's reference, generated from its schema (ExperimentConfig.model_json_schema()):
every key with its type, default, bounds and why. docs/config-reference.md is this module's output,
and a test fails when the two differ, so the document cannot drift from the code.

    python -m securefpt.config_reference > docs/config-reference.md
"""

from __future__ import annotations

import json
from typing import Any

from securefpt.experiment.config import ExperimentConfig

BOUNDS = {"minimum": ">= {}", "exclusiveMinimum": "> {}", "maximum": "<= {}", "exclusiveMaximum": "< {}",
          "maxLength": "at most {} characters"}


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        return "section"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "anyOf" in prop:
        kinds = [_type(p, defs) for p in prop["anyOf"]]
        return " or ".join(dict.fromkeys(k for k in kinds if k != "null")) + (" or null" if "null" in kinds else "")
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}), defs)}"
    if kind == "object":
        extra = prop.get("additionalProperties")
        return f"map to {_type(extra, defs)}" if isinstance(extra, dict) else "map"
    if prop.get("format") == "path":
        return "path"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}.get(kind, kind)


def _bounds(prop: dict[str, Any]) -> str:
    found = [fmt.format(prop[key]) for key, fmt in BOUNDS.items() if key in prop]
    for option in prop.get("anyOf", []):
        found += [fmt.format(option[key]) for key, fmt in BOUNDS.items() if key in option]
    return ", ".join(found)


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return "required"
    value = prop["default"]
    if isinstance(value, dict) and value:
        return "see below"
    return f"`{json.dumps(value)}`"


def _ref(prop: dict[str, Any]) -> str | None:
    for option in [prop, *prop.get("anyOf", []), prop.get("additionalProperties") or {}]:
        if isinstance(option, dict) and "$ref" in option:
            return option["$ref"].rsplit("/", 1)[-1]
    return None


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def reference_markdown() -> str:
    schema = ExperimentConfig.model_json_schema()
    defs = schema.get("$defs", {})
    lines = ["# Experiment file reference", "",
             "Generated from the schema of `ExperimentConfig` (securefpt/experiment/config.py) by "
             "`python -m securefpt.config_reference`; a test keeps this file equal to the code. Any key can be "
             "overridden on the command line: `securefpt run exp.yaml --set fl.rounds=20`.", ""]
    sections: list[tuple[str, dict[str, Any]]] = [("", schema)]
    seen: set[str] = set()
    while sections:
        prefix, model = sections.pop(0)
        title = f"`{prefix}`" if prefix else "top level"
        tag = model.get("properties", {}).get("method", {}).get("const")
        if tag is not None:  # one type of a tagged union (a PEFT method)
            title = f"`{prefix}` with `method: {tag}`"
        lines += [f"## {title}", "", _one_line(model.get("description")), "",
                  "| key | type | default | bounds | why |", "|---|---|---|---|---|"]
        for name, prop in model.get("properties", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            if "oneOf" in prop:  # a tagged union: a section per type, each with its own keys
                refs = [option["$ref"].rsplit("/", 1)[-1] for option in prop["oneOf"]]
                tags = [defs[r]["properties"]["method"]["const"] for r in refs]
                links = ", ".join(f"[`{t}`](#{key.replace('.', '')}-with-method-{t})" for t in tags)
                lines.append(f"| `{key}` | one section by `{key}.method`: {links} | `{tags[0]}` | | "
                             f"{_one_line(prop.get('description'))} |")
                sections += [(key, defs[r]) for r in refs]
                continue
            ref = _ref(prop)
            kind = f"section ([`{key}`](#{key.replace('.', '')}))" if ref and "additionalProperties" not in prop \
                else _type(prop, defs)
            if ref and "additionalProperties" in prop:
                kind = f"map of language to section ([`{key}.<language>`](#{key.replace('.', '')}language))"
            why = _one_line(prop.get("description"))
            lines.append(f"| `{key}` | {kind} | {_default(prop)} | {_bounds(prop)} | {why} |")
            if ref and ref not in seen:
                seen.add(ref)
                sections.append((key + (".<language>" if "additionalProperties" in prop else ""), defs[ref]))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
