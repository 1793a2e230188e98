"""`securefpt audit privacy`: run an experiment with canaries and measure what an attacker learns.

For each setting (no DP, local DP-SGD, distributed DP where secure aggregation is on) the
experiment runs on the simulation engine with trial nodes. Each node trains, besides its
own rows, on the canaries whose fair coin came up "in" (random token strings with random
labels: records no other record explains); the coins stay in the audit folder, never in
a message. The attacker then scores every canary from what a real adversary holds
(`attacks.py`): the released global encoder, each round's aggregate the coordinator
unmasked, and (as the auditor's reference models) shadow runs trained the same way without
canaries. The scores give the one-run lower bound on epsilon and the membership-inference
figures (privacy/auditing.py), set beside the epsilon the nodes claim. Each node's
personalized model, which never leaves the node, is attacked apart: its figures are
reported, not held against the claim (the claim covers what a node sends). A run that
finished (a setting's, a reference's) is read back, not trained again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from securefpt.engines.preflight import task_labels
from securefpt.errors import ConfigError, FederationError
from securefpt.experiment.config import ExperimentConfig
from securefpt.privacy.auditing import CONFIDENCE, membership, one_run_lower_bound

CANARY_TOKENS = 12
POPULATION = 200  # fresh random records known to be out: the reference attacks' population
SETTINGS = ("no-dp", "local-dp", "distributed-dp")
AGGREGATES = "aggregates.npz"


@dataclass(frozen=True)
class Setting:
    name: str
    cfg: ExperimentConfig


def plan_settings(cfg: ExperimentConfig, epsilon: float, names=SETTINGS) -> tuple[list[Setting], dict[str, str]]:
    """The audited variants of `cfg` (the same experiment, DP switched as each setting says), and the
    settings left out with the reason."""
    if cfg.clients is not None or cfg.paradigm != "federated":
        raise ConfigError("audit privacy runs a federated experiment on the operator's own data (a config without "
                          "clients): an institution audits with its own copy of its data")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": task_labels(cfg)})})
    dp = cfg.dp.model_copy(update={"enabled": True, "target_epsilon": epsilon})
    out, skipped = [], {}
    for name in names:
        if name == "no-dp":
            out.append(Setting(name, cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"enabled": False})})))
        elif name == "local-dp":
            local = dp.model_copy(update={"mode": "local", "noise_multiplier": None})
            out.append(Setting(name, cfg.model_copy(update={"dp": local})))
        elif not cfg.secagg.enabled:
            skipped[name] = "needs secure aggregation (secagg.enabled: true)"
        elif cfg.personalization.local_head:
            skipped[name] = "needs a shared head (personalization.local_head: false)"
        else:
            from securefpt.engines.dp_planning import distributed_noise

            planned = cfg.model_copy(update={"dp": dp.model_copy(update={"mode": "distributed"})})
            sigma = distributed_noise(planned, epsilon)
            out.append(Setting(name, planned.model_copy(update={"dp": planned.dp.model_copy(
                update={"noise_multiplier": sigma, "target_epsilon": None})})))
    return out, skipped


def random_records(cfg: ExperimentConfig, counts: dict[str, int], rng: np.random.Generator) -> dict[str, list[dict]]:
    """`counts[language]` records a language: strings of random vocabulary pieces, each with a random label and
    a fair coin (the vocabulary is read once for every node)."""
    from securefpt.learning.backbone import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    special = set(tokenizer.all_special_ids)
    ids = np.array([i for i in range(len(tokenizer)) if i not in special])
    labels = cfg.data.labels
    return {lang: [{"text": tokenizer.decode(rng.choice(ids, CANARY_TOKENS).tolist()).strip(),
                    "label": labels[int(rng.integers(len(labels)))], "in": bool(rng.integers(2))}
                   for _ in range(count)] for lang, count in counts.items()}


def make_canaries(cfg: ExperimentConfig, count: int, rng: np.random.Generator) -> dict[str, list[dict]]:
    """`count` canaries a language, each in by its coin."""
    return random_records(cfg, {lang: count for lang in cfg.data.languages}, rng)


def _plant(nodes: list[Path], canaries: dict[str, list[dict]], task: str) -> None:
    """Give each trial node (in language order) its included canaries (the file holds no coin: what it
    holds is what is in)."""
    for path, language in zip(nodes, canaries, strict=True):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        rows = [{"text": c["text"], "label": c["label"]} for c in canaries[language] if c["in"]]
        target = path.parent / "canaries.jsonl"
        target.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        config["data"][task]["canaries"] = str(target.resolve())
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _finished(folder: Path, cfg: ExperimentConfig) -> Optional[tuple[dict, dict]]:
    """A finished run of this very setting in `folder` (its summary and canaries), or None."""
    summary, coins = folder / "run" / "summary.json", folder / "canaries.json"
    if not (summary.is_file() and coins.is_file() and (folder / AGGREGATES).is_file()):
        return None
    record = json.loads(coins.read_text(encoding="utf-8"))
    if record.get("config") != cfg.sha256():
        return None
    return json.loads(summary.read_text(encoding="utf-8")), record["canaries"]


def train_setting(setting: Setting, folder: Path, canaries_per_node: int, show_progress: bool,
                  client_app=None) -> tuple[dict, dict[str, list[dict]], bool]:
    """Run one setting with canaries, or read back its finished run: its summary, its canaries and
    whether it was read back."""
    from securefpt.engines.simulation import run_federated_simulation
    from securefpt.engines.trial_nodes import write_trial_nodes

    cfg = setting.cfg
    done = _finished(folder, cfg)
    if done is not None and all(len(c) == canaries_per_node for c in done[1].values()):
        return (*done, True)
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))  # coins nobody else can predict
    canaries = make_canaries(cfg, canaries_per_node, rng)
    nodes = write_trial_nodes(cfg, folder / "run" / "nodes")
    if canaries_per_node:
        _plant(nodes, canaries, cfg.data.task)
    aggregates: dict[str, np.ndarray] = {}

    def keep(server_round: int, change: dict) -> None:  # what the coordinator unmasks, round by round
        aggregates.update((f"{server_round}|{name}", np.asarray(a, dtype=np.float32)) for name, a in change.items())

    summary = run_federated_simulation(cfg, folder / "run", show_progress=show_progress, nodes=nodes,
                                       client_app=client_app, on_aggregate=keep)
    np.savez(folder / AGGREGATES, **aggregates)
    # the auditor's record of every canary and its coin; written last, it marks a finished setting
    (folder / "canaries.json").write_text(json.dumps({"config": cfg.sha256(), "canaries": canaries}),
                                          encoding="utf-8")
    return summary, canaries, False


def claimed_epsilon(summary: dict) -> Optional[float]:
    """The largest epsilon any node reported spending (None without DP)."""
    spent = [e for e in ((summary.get("privacy") or {}).get("epsilon") or {}).values() if e is not None]
    return max(spent) if spent else None


def _views(setting: Setting, folder: Path, references: list[tuple[int, dict]]):
    """What the adversaries hold after the setting's run (attacks.Views)."""
    from securefpt.engines.attacks import Views
    from securefpt.learning.artifacts import load_arrays
    from securefpt.learning.classifier import read_request
    from securefpt.node.personal import Personal

    run = folder / "run"
    aggregates: dict[int, dict] = {}
    with np.load(folder / AGGREGATES) as stored:
        for key in stored.files:
            server_round, name = key.split("|", 1)
            aggregates.setdefault(int(server_round), {})[name] = stored[key]
    request = read_request(run / "request.json")
    personalized = {lang: arrays for lang in setting.cfg.data.languages
                    if (arrays := Personal(run / "nodes" / lang, request).model()) is not None}
    return Views(load_arrays(run / "prompt_encoder.safetensors"), aggregates, references, personalized)


def _figures(values: np.ndarray, coins: np.ndarray, node_of: np.ndarray, languages: list[str], view: str,
             confidence: float) -> dict:
    bound, mia = one_run_lower_bound(values, coins, confidence), membership(values, coins)
    return {"view": view, "epsilon_lower_bound": bound.epsilon, "guesses": bound.guesses, "correct": bound.correct,
            "mia_auc": mia.auc, "tpr_at_fpr_0.01": mia.tpr_at_fpr[0.01], "tpr_at_fpr_0.001": mia.tpr_at_fpr[0.001],
            "per_node_auc": {lang: membership(values[node_of == lang], coins[node_of == lang]).auc
                             for lang in languages},
            "roc": [np.round(a, 5).tolist() for a in mia.roc]}


def train_references(setting: Setting, folder: Path, count: int, show_progress: bool, client_app=None,
                     log=print) -> tuple[list[tuple[int, dict]], bool]:
    """`count` shadow runs of the setting without canaries, each with its own seed (its own initial model,
    sample and training randomness): the auditor's reference models, trained on its own copy of the data
    as the audited run was, in `folder`'s sibling folders. Their (seed, released encoder), and whether all
    were read back. The attacker they make knows every record but the canaries' coins: the adversary DP
    is a promise against."""
    from securefpt.learning.artifacts import load_arrays

    out, cached = [], True
    for k in range(1, count + 1):
        seed = setting.cfg.seed + k
        shadow = Setting(f"{setting.name}-reference-{k}", setting.cfg.model_copy(update={"seed": seed}))
        where = folder.parent / shadow.name
        log(f"  reference run {k}/{count} ({setting.name}, seed {seed}, no canaries)")
        cached &= train_setting(shadow, where, 0, show_progress, client_app)[2]
        out.append((seed, load_arrays(where / "run" / "prompt_encoder.safetensors")))
    return out, cached


def _distinct(scores: dict[str, tuple[str, np.ndarray]]) -> int:
    """How many attacks rank the canaries differently (twins, e.g. `aggregates` and `update` under plain
    FedAvg, share one share of the error)."""
    return len({tuple(np.argsort(values, kind="stable")) for _, values in scores.values()})


def audit_setting(setting: Setting, folder: Path, canaries_per_node: int, show_progress: bool = True,
                  client_app=None, references: int = 0, log=print) -> dict:
    """One setting's figures: the claim, the attacks' lower bounds and membership figures (the headline
    from what leaves the nodes; each node's personalized model apart)."""
    from securefpt.engines.attacks import NODE, score_canaries

    start = time.perf_counter()
    summary, canaries, cached = train_setting(setting, folder, canaries_per_node, show_progress, client_app)
    shadows, references_cached = train_references(setting, folder, references, show_progress, client_app, log)
    languages = setting.cfg.data.languages
    pooled = [c for lang in languages for c in canaries[lang]]
    node_of = np.array([lang for lang in languages for _ in canaries[lang]])
    coins = np.array([c["in"] for c in pooled])
    population = [r for rows in random_records(setting.cfg, {"population": POPULATION},
                                               np.random.default_rng(setting.cfg.seed)).values() for r in rows]
    scores = score_canaries(setting.cfg, _views(setting, folder, shadows), pooled, node_of, population)
    released = {name: s for name, s in scores.items() if s[0] != NODE}
    # the bounds of the released views' attacks are read together: each ranking at its share of the 5% error
    confidence = 1 - (1 - CONFIDENCE) / _distinct(released)
    attacks = {name: _figures(values, coins, node_of, languages, view, confidence)
               for name, (view, values) in released.items()}
    personalized = {name: _figures(values, coins, node_of, languages, view, CONFIDENCE)
                    for name, (view, values) in scores.items() if view == NODE}
    if setting.cfg.personalization.adapt_epochs and not personalized:
        log(f"  {setting.name}: not every node kept a personalized model; none is attacked")
    strongest = max(attacks.values(), key=lambda a: a["mia_auc"])
    dp = setting.cfg.dp
    return {"setting": setting.name, "dp_mode": dp.mode if dp.enabled else "none",
            "epsilon_claimed": claimed_epsilon(summary), "delta": dp.delta if dp.enabled else None,
            "epsilon_lower_bound": max(a["epsilon_lower_bound"] for a in attacks.values()),
            "mia_auc": strongest["mia_auc"], "tpr_at_fpr_0.01": max(a["tpr_at_fpr_0.01"] for a in attacks.values()),
            "tpr_at_fpr_0.001": max(a["tpr_at_fpr_0.001"] for a in attacks.values()),
            "confidence": CONFIDENCE, "canaries": len(pooled), "canaries_in": int(coins.sum()),
            "references": references, "references_cached": references_cached,
            "accuracy": (summary.get("final") or {}).get("accuracy", {}).get("avg"),
            "seconds": round(time.perf_counter() - start, 1), "cached": cached, "attacks": attacks,
            "personalized": personalized}


def run_privacy_audit(cfg: ExperimentConfig, out: Path, epsilon: float, canaries_per_node: int,
                      names=SETTINGS, show_progress: bool = True, client_app=None, log=print,
                      references: int = 0) -> dict:
    """Audit every setting; write privacy-audit.json and the report into `out`; return the figures."""
    from securefpt.engines.privacy_report import write_report

    settings, skipped = plan_settings(cfg, epsilon, names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"model": cfg.model.name, "languages": cfg.data.languages, "rounds": cfg.fl.rounds,
               "epsilon_target": epsilon, "canaries_per_node": canaries_per_node, "references": references,
               "settings": [],
               "skipped": skipped}
    for i, setting in enumerate(settings, 1):
        log(f"audit {i}/{len(settings)}: {setting.name} ({canaries_per_node} canaries a node, "
            f"{len(setting.cfg.data.languages)} nodes, {setting.cfg.fl.rounds} rounds)")
        try:
            figures["settings"].append(audit_setting(setting, out / setting.name, canaries_per_node,
                                                     show_progress, client_app, references, log))
        except FederationError as exc:  # the nodes' own rules refused it (e.g. noise that swamps the update)
            figures["skipped"][setting.name] = f"the nodes refused it: {exc}"
            log(f"  {setting.name}: not audited (the nodes refused it: {exc})")
        # after every setting: an audit stopped later keeps what it measured
        (out / "privacy-audit.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
        write_report(figures, out)
    return figures
