"""The run's model card (`README.md` beside the PEFT adapter): the facts a reader of the adapter
needs, taken from `summary.json`, instead of PEFT's empty template."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _accuracy_table(summary: dict[str, Any]) -> list[str]:
    final = summary["final"]
    personal = final.get("personalized_accuracy") or {}
    rows = ["| language | accuracy | personalized |", "|---|---|---|"]
    for lang, value in final["accuracy"].items():
        mine = personal.get(lang)
        rows.append(f"| {lang} | {value:.3f} | {'' if mine is None else f'{mine:.3f}'} |")
    return rows


def model_card(summary: dict[str, Any]) -> str:
    backbone = summary.get("backbone") or {}
    privacy = summary["privacy"]
    released = {k: v for k, v in (privacy.get("epsilon") or {}).items() if v is not None}
    alone = {k: v for k, v in (privacy.get("epsilon_alone") or {}).items() if v is not None}
    if privacy.get("enabled") and privacy.get("mode") == "distributed":
        dp = (f"distributed DP under SecAgg+ (each node adds a Skellam share of the sum's noise; "
              f"{privacy.get('accountant')} accountant), delta {privacy['delta']:g}; epsilon each node released: "
              + (", ".join(f"{k} {v:g}" for k, v in released.items()) or "none")
              + "; from its own noise shares alone, were all others to collude: "
              + (", ".join(f"{k} {v:g}" for k, v in alone.items()) or "none"))
    elif privacy.get("enabled"):
        dp = (f"DP-SGD on every node (Opacus, {privacy.get('accountant')} accountant), delta {privacy['delta']:g}; "
              f"epsilon each node released: " + (", ".join(f"{k} {v:g}" for k, v in released.items()) or "none"))
    else:
        dp = "none: no differential privacy guarantee"
    outside = backbone.get("languages_outside_pretraining")
    clients = summary["clients"].values()
    lines = [
        "---", f"base_model: {summary['model']}", "library_name: peft", "tags: [securefpt, prompt-tuning, federated]",
        "---", "", f"# {summary['name']}", "",
        f"A {summary['peft_method']} adapter and classification head trained with securefpt "
        f"({summary['paradigm']}, {len(summary['rounds'])} rounds). Load it with "
        "`securefpt.load_classifier(<this folder's run directory>)`.", "",
        "## Facts", "",
        f"- **Task**: classify into {', '.join(summary['labels'])}",
        f"- **Languages**: {', '.join(c['language'] for c in clients)}",
        f"- **Base model**: `{summary['model']}`" + (f", {backbone['origin']}; weights: {backbone['weights']}"
                                                     if backbone else ""),
        f"- **Languages outside the base model's pretraining**: {', '.join(outside) if outside else 'none known'}"
        if outside is not None else "- **Languages outside the base model's pretraining**: unknown",
        f"- **PEFT method**: {summary['peft_method']} ({summary['trainable_params']:,} trainable of "
        f"{summary['total_params']:,} parameters)",
        f"- **Differential privacy**: {dp}",
        "- **Secure aggregation**: " + ("SecAgg+ (the coordinator saw only sums)"
                                        if summary["secure_aggregation"].get("enabled") else "off"),
        f"- **Audit log head**: `{summary.get('audit_head')}` (verify with `securefpt audit verify`)", "",
        "## Accuracy (evaluation split of each node, as each node's rules released it)", "",
        *_accuracy_table(summary), "",
        "## Residency decisions", "",
        *[f"- {cid} ({c['region'] or c['language']}): {'included' if c['included'] else 'excluded'}; {c['reason']}"
          for cid, c in summary["clients"].items()], "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, summary: dict[str, Any]) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(summary), encoding="utf-8")
    return path
