"""A study's report: Markdown tables shaped like the paper's Tables 1-4, and PNG plots.

Accuracies are percentages of each language's held-out evaluation rows; the paper's own
figures (study/paper.py, XLM-R base on its splits) are set beside ours for the pattern,
not as a like-for-like target.
"""

from __future__ import annotations

from pathlib import Path

from securefpt.experiment.config import ExperimentConfig
from securefpt.protocol.request import virtual_tokens, with_method
from securefpt.study import paper
from securefpt.study.communication import float32_traffic, xlmr_base_counts
from securefpt.study.config import StudyConfig
from securefpt.study.distance import distance, model_mix

PARAMETER_EFFICIENT = ("prompt_tuning", "p_tuning", "lora")


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _paper_block(title: str, table: dict, languages: list[str]) -> list[str]:
    if not set(languages) <= set(next(iter(table.values()))):
        return []
    rows = [[name, *(f"{values[x]:.1f}" for x in languages), f"{values['avg']:.1f}"] for name, values in table.items()]
    return ["", f"The paper's {title} (XLM-R base):", ""] + _table(["Method"] + languages + ["Avg"], rows)


def _describe(record: dict) -> str:
    part, where = record.get("partition"), ""
    if part:
        alpha = f" α={part['alpha']}" if part["scheme"] == "dirichlet" else ""
        where = f", {record['clients']} clients {part['scheme']}{alpha}"
    pe = "PE " if record["peft_method"] in PARAMETER_EFFICIENT else ""
    return f"{pe}{record['paradigm']} ({record['peft_method']}{where})"


def _accuracy_rows(records: dict, names: list[str], languages: list[str]) -> list[list[str]]:
    return [[name, _describe(records[name])] + [_pct(records[name]["accuracy"].get(x)) for x in languages]
            + [_pct(records[name]["accuracy"]["avg"])] for name in names]


def _bars(path: Path, records: dict, names: list[str], languages: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = languages + ["avg"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(columns)), 3.6))
    for i, name in enumerate(names):
        values = [100 * (records[name]["accuracy"].get(x) or 0) for x in columns]
        ax.bar(np.arange(len(columns)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(columns)) + width * (len(names) - 1) / 2, columns)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lines(path: Path, xs: list, series: dict[str, list], xlabel: str, title: str, log_x: bool = False,
           scatter: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, ys in series.items():
        if scatter:
            ax.scatter(xs, ys, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(study: StudyConfig, base: ExperimentConfig, records: dict[str, dict], out: Path) -> Path:
    """`out/report.md` and its PNGs; the report's path."""
    languages = list(base.data.languages)
    cells = {c.name: c for c in study.all_cells()}
    lines = [f"# Study {study.name}", "",
             f"Model {base.model.name}, task {base.data.task}, languages {', '.join(languages)}; "
             f"{len(records)} cells, {sum(r['seconds'] for r in records.values()) / 60:.1f} min of runs (the sum "
             "of the cells' own times). Accuracy in % of each language's evaluation rows, final global model "
             "(monolingual: each language's own model); one seed."]
    paradigms = [n for n, c in cells.items() if c.section == "paradigms"]
    if paradigms:
        lines += ["", "## Table 1/3: paradigms", ""]
        lines += _table(["Cell", "Paradigm", *languages, "Avg"], _accuracy_rows(records, paradigms, languages))
        lines += _paper_block("Table 3 (MasakhaNEWS)", paper.MASAKHANEWS, languages)
        lines += _paper_block("Table 1 (NC)", paper.NEWS_CLASSIFICATION, languages)
        _bars(out / "paradigms.png", records, paradigms, languages, "paradigms")
        lines += ["", "![paradigms](paradigms.png)"]
    partitions = [n for n, c in cells.items() if c.section == "partitions"]
    if partitions:
        lines += ["", "## Table 2: IID vs non-IID clients", "",
                  "Clients hold partitions of the pooled languages (flwr-datasets); accuracy is the final global "
                  "model's on each language's evaluation rows. `client avg` is the mean of the clients' own "
                  "evaluation shares."]
        rows = _accuracy_rows(records, partitions, languages)
        for row, name in zip(rows, partitions):
            row.append(_pct(records[name]["client_accuracy"]["avg"]))
        lines += [""] + _table(["Cell", "Clients", *languages, "Avg", "client avg"], rows)
        nc = {k: v for k, v in paper.NEWS_CLASSIFICATION.items() if "FL" in k}
        lines += ["", "The paper's Table 1 federated rows (NC, en es fr de ru), for the IID/non-IID pattern:", ""]
        lines += _table(["Method", "Avg"], [[k, f"{v['avg']:.1f}"] for k, v in nc.items()])
        _bars(out / "partitions.png", records, partitions, languages, "IID vs non-IID")
        lines += ["", "![partitions](partitions.png)"]
    eff = study.data_efficiency
    if eff:
        fed = [records[f"efficiency-federated-{n}"]["accuracy"][eff.language] for n in eff.sizes]
        mono = [records[f"efficiency-monolingual-{n}"]["accuracy"][eff.language] for n in eff.sizes]
        lines += ["", f"## Data efficiency: {eff.language}'s training set shrunk", "",
                  f"The other languages keep their data; accuracy on {eff.language}'s evaluation rows."]
        lines += [""] + _table(["Training rows", "Federated", "Monolingual", "Federated − monolingual"],
                               [[str(n), _pct(f), _pct(m), f"{100 * (f - m):+.1f}"]
                                for n, f, m in zip(eff.sizes, fed, mono)])
        _lines(out / "data_efficiency.png", eff.sizes, {"federated": [100 * x for x in fed],
                                                         "monolingual": [100 * x for x in mono]},
               f"{eff.language} training rows", "data efficiency", log_x=True)
        lines += ["", "![data efficiency](data_efficiency.png)"]
    if study.distance:
        mix = model_mix(base.model.name)
        phi = {x: distance(x, mix, study.distance.features) for x in languages}
        lines += ["", "## Language distance to the pretraining languages", "",
                  f"phi = −log cos(v, V_p) over URIEL {'+'.join(study.distance.features)} (lang2vec); V_p weights "
                  f"{base.model.name}'s pretraining languages by their share ({len(mix)} language(s))."]
        header = ["Language", "phi"] + study.distance.cells
        rows = [[x, f"{phi[x]:.3f}"] + [_pct(records[c]["accuracy"].get(x)) for c in study.distance.cells]
                for x in sorted(languages, key=phi.get)]
        lines += [""] + _table(header, rows)
        order = sorted(languages, key=phi.get)
        _lines(out / "language_distance.png", [phi[x] for x in order],
               {c: [100 * records[c]["accuracy"][x] for x in order] for c in study.distance.cells},
               "phi (distance to the pretraining languages)", "accuracy against language distance", scatter=True)
        lines += ["", "![language distance](language_distance.png)"]
    if study.communication:
        lines += ["", "## Table 4: what federated tuning sends", "",
                  "Measured: every serialized Flower message of the cell: the global encoder down (to train, and "
                  "again to evaluate), the updates and the SecAgg+ protocol's traffic up."]
        rows = []
        for name in study.communication.cells:
            r = records[name]
            rows.append([name, r["peft_method"], f"{r['trainable_params']:,}", f"{r['total_params']:,}",
                         f"{r['clients']} x {r['rounds']}", f"{r['bytes'] / 1e6:,.2f}"])
        lines += [""] + _table(["Cell", "Method", "Trainable", "Total", "Clients x rounds", "Measured MB"], rows)
        methods = list(paper.COMMUNICATION)
        counts = xlmr_base_counts(base.peft, paper.COMMUNICATION_LABELS, methods)
        lora = with_method(base.peft, "lora")
        k, r = paper.COMMUNICATION_CLIENTS, paper.COMMUNICATION_ROUNDS
        rows = [[m, f"{counts[m][0]:,}", f"{float32_traffic(counts[m][0], k, r) / 1e6:,.0f}",
                 f"{paper.COMMUNICATION[m]['trainable']:,}", f"{paper.COMMUNICATION[m]['megabytes']:,}"]
                for m in methods]
        lines += ["", f"XLM-R base, {k} clients x {r} rounds, float32 both ways (computed from securefpt's own "
                      f"assembly, {virtual_tokens(base.peft)} virtual tokens, LoRA r={lora.lora_r} on query "
                      "and value, a linear head), beside the paper's Table 4:", ""]
        lines += _table(["Method", "Trainable (ours)", "MB (ours)", "Trainable (paper)", "MB (paper)"], rows)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
