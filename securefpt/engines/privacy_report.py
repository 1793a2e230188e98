"""The privacy audit's report for a deployment review: a markdown page and two plots."""

from __future__ import annotations

from pathlib import Path


def _num(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def verdict(setting: dict) -> str:
    claimed, bound = setting["epsilon_claimed"], setting["epsilon_lower_bound"]
    if claimed is None:
        return "no guarantee claimed"
    return "consistent with the claim" if bound <= claimed else "**the claim is refuted**"


def markdown(figures: dict) -> str:
    lines = [f"# Privacy audit: {figures['model']}, {', '.join(figures['languages'])}", "",
             f"{figures['canaries_per_node']} canaries a node (each in by a fair coin the auditor keeps), "
             f"{figures['rounds']} rounds, target epsilon {figures['epsilon_target']:g}, "
             f"{figures.get('references', 0)} reference (shadow) runs a setting. The attacker sees only the "
             "released global encoder and each round's aggregate the coordinator unmasked. Lower bounds: Steinke, "
             "Nasr & Jagielski's one-run audit at 95% confidence (pure-DP form); membership figures on the canaries.",
             "", "| setting | epsilon claimed | epsilon lower bound | verdict | MIA AUC | TPR at 1% FPR "
             "| TPR at 0.1% FPR | accuracy |", "|---|---|---|---|---|---|---|---|"]
    for s in figures["settings"]:
        lines.append(f"| {s['setting']} | {_num(s['epsilon_claimed'])} | {_num(s['epsilon_lower_bound'])} | "
                     f"{verdict(s)} | {_num(s['mia_auc'], 3)} | {_num(s['tpr_at_fpr_0.01'], 3)} | "
                     f"{_num(s['tpr_at_fpr_0.001'], 3)} | {_num(s['accuracy'], 3)} |")
    lines += ["", "## Each attack", "", "| setting | attack | view | epsilon lower bound (correct/guesses) | AUC | "
              "TPR at 1% FPR | AUC per node |", "|---|---|---|---|---|---|---|"]
    for s in figures["settings"]:
        for name, a in s["attacks"].items():
            per_node = ", ".join(f"{lang} {auc:.2f}" for lang, auc in a["per_node_auc"].items())
            lines.append(f"| {s['setting']} | {name} | {a['view']} | {_num(a['epsilon_lower_bound'])} "
                         f"({a['correct']}/{a['guesses']}) | {_num(a['mia_auc'], 3)} | "
                         f"{_num(a['tpr_at_fpr_0.01'], 3)} | {per_node} |")
    personal = [s for s in figures["settings"] if s.get("personalized")]
    if personal:
        lines += ["", "## Each node's personalized model", "",
                  "It never leaves the node, so the claim does not cover it: this is what someone who took a node's "
                  "personalized model would learn of that node's canaries.", "",
                  "| setting | epsilon lower bound (correct/guesses) | AUC | TPR at 1% FPR | AUC per node |",
                  "|---|---|---|---|---|"]
        for s in personal:
            a = s["personalized"]["personalized"]
            per_node = ", ".join(f"{lang} {auc:.2f}" for lang, auc in a["per_node_auc"].items())
            lines.append(f"| {s['setting']} | {_num(a['epsilon_lower_bound'])} ({a['correct']}/{a['guesses']}) | "
                         f"{_num(a['mia_auc'], 3)} | {_num(a['tpr_at_fpr_0.01'], 3)} | {per_node} |")
    for name, why in figures["skipped"].items():
        lines.append(f"\n{name}: not audited ({why}).")
    lines += ["", "![ROC curves](privacy-audit-roc.png)", "",
              "![claimed and empirical epsilon](privacy-audit-epsilon.png)", ""]
    return "\n".join(lines)


def plots(figures: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for s in figures["settings"]:
        name, a = max(s["attacks"].items(), key=lambda item: item[1]["mia_auc"])
        fpr, tpr = a["roc"]
        ax.plot(fpr, tpr, label=f"{s['setting']} ({name}, AUC {a['mia_auc']:.2f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k:", label="chance")
    ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1.05), xlabel="false-positive rate",
           ylabel="true-positive rate", title="Membership inference on the canaries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "privacy-audit-roc.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [s["setting"] for s in figures["settings"]]
    x = range(len(names))
    claimed = [s["epsilon_claimed"] or 0 for s in figures["settings"]]
    ax.bar([i - 0.2 for i in x], claimed, 0.4, label="claimed (no DP: none)")
    ax.bar([i + 0.2 for i in x], [s["epsilon_lower_bound"] for s in figures["settings"]], 0.4,
           label="empirical lower bound")
    ax.set(xticks=list(x), xticklabels=names, ylabel="epsilon", title="Claimed against measured epsilon")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "privacy-audit-epsilon.png", dpi=120)
    plt.close(fig)


def write_report(figures: dict, out: Path) -> None:
    (out / "privacy-audit.md").write_text(markdown(figures), encoding="utf-8")
    plots(figures, out)
