"""The attacker's scores for each canary, from what each adversary holds (a higher score: "it was in").

Anyone holding the released global encoder (the public initial encoder every party builds
from the experiment's seed beside it):
- `loss`: minus the canary's loss under the released encoder;
- `calibrated`: the loss drop from the initial encoder to the released one, a reference
  model that cancels how hard each canary is anyway (Watson et al. 2022);
- `update`: which canaries' clipped gradients at theta_0 add up to the released change
  theta_T - theta_0: a least-squares fit, each canary's coefficient its score.
With reference models (shadow runs the auditor trains the same way on its own data, without
canaries, each scored from its own initial model), the offline reference attacks, calibrated
per canary and against population records known to be out:
- `lira`: Carlini et al. 2022, offline with a fixed variance (their variant for few shadow
  models): the target's logit-scaled confidence minus the references' mean, over the spread
  of that difference on the population (a z-score: the ranking is the difference's);
- `rmia`: Zarifzadeh et al. 2024 offline (a = 1, gamma = 1): the share of population records
  z whose likelihood ratio p(z|target) / p(z|references) the canary's exceeds.
The coordinator (it unmasks each round's aggregate, before its optimizer's step):
- `aggregates`: the least-squares fit to each round's aggregate, summed over rounds (with
  plain FedAvg at lr 1 the same ranking as `update`; the audit counts such twins once);
- `first-round`: the same on the first aggregate it unmasked alone (one round's sum).
A node's personalized model (it never leaves the node; scored as if it were taken):
- `personalized`: the loss drop from the initial encoder to the node's own model, each
  canary scored by its own node's model.
Full fine-tuning has no least-squares attacks (Opacus cannot take a whole BERT's per-example
gradients). A local head is not released: the attacker scores with the initial head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from securefpt.experiment.config import ExperimentConfig
from securefpt.learning.data import Example
from securefpt.learning.modeling import AssembledModel, build_model, get_trainable, set_trainable

FINAL, COORDINATOR, NODE = "final model", "aggregates", "personalized model"


@dataclass
class Views:
    """What the adversaries hold after a run."""

    released: dict  # the global encoder
    aggregates: dict[int, dict] = field(default_factory=dict)  # round -> unmasked aggregate
    references: list[tuple[int, dict]] = field(default_factory=list)  # the shadow runs' (seed, released encoder)
    personalized: dict[str, dict] = field(default_factory=dict)  # node -> its personalized model


def _examples(cfg: ExperimentConfig, canaries: list[dict]) -> list[Example]:
    index = {name: i for i, name in enumerate(cfg.data.labels)}
    return [Example(text=c["text"], label=index[c["label"]]) for c in canaries]


@torch.no_grad()
def _confidence(assembled: AssembledModel, examples: list[Example], batch: int = 64) -> np.ndarray:
    """[n, 2]: log p(true label) and log (1 - p(true label)), from the logits (no saturation at p = 1)."""
    model = assembled.model
    model.eval()
    out = []
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        enc = assembled.encode(chunk)
        logits = model(enc["input_ids"], enc["attention_mask"]).double().cpu()
        labels = torch.tensor([e.label for e in chunk])
        total = torch.logsumexp(logits, dim=1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        out.append(torch.stack([logits.gather(1, labels[:, None])[:, 0] - total,
                                torch.logsumexp(others, dim=1) - total], dim=1))
    return torch.cat(out).numpy()


def _losses(assembled: AssembledModel, examples: list[Example]) -> np.ndarray:
    return -_confidence(assembled, examples)[:, 0]


def _under(assembled: AssembledModel, initial: dict, arrays: dict) -> AssembledModel:
    set_trainable(assembled.model, {**initial, **{k: v for k, v in arrays.items() if k in initial}})
    return assembled


class GradientFit:
    """Which canaries' clipped gradients at theta_0 add up to a change: b = argmin |change + G^T b|^2 +
    lam |b|^2, G the canaries' clipped gradients (rows), lam 1% of their mean squared norm. A sum of
    clipped gradients (one DP-FedSGD round without noise) is recovered nearly exactly; DP noise hides it."""

    def __init__(self, assembled: AssembledModel, examples: list[Example], names: list[str], clip: float,
                 chunk: int = 64) -> None:
        from securefpt.learning.distributed_dp import per_example_gradients

        self.names = names  # the shared parameters: what a change holds
        rows = []
        for start in range(0, len(examples), chunk):
            grads = per_example_gradients(assembled, examples[start:start + chunk], names)
            grads *= np.minimum(1.0, clip / np.maximum(np.linalg.norm(grads, axis=1), 1e-12))[:, None]
            rows.append(grads.astype(np.float32))
        self.gradients = np.concatenate(rows).astype(np.float64)
        gram = self.gradients @ self.gradients.T
        self.system = gram + 0.01 * np.trace(gram) / len(gram) * np.eye(len(gram))

    def scores(self, change: dict) -> np.ndarray:
        target = np.concatenate([np.asarray(change[n], dtype=np.float64).ravel() for n in self.names])
        return -np.linalg.solve(self.system, self.gradients @ target)


def _reference_scores(target: np.ndarray, references: np.ndarray, population: slice) -> dict:
    """`lira` and `rmia` from the target's [n, 2] and the references' [k, n, 2] confidences (`_confidence`);
    `population` marks the records known to be out (scored, not returned)."""
    gap = (target[:, 0] - target[:, 1]) - (references[..., 0] - references[..., 1]).mean(axis=0)
    lira = gap / max(float(np.std(gap[population])), 1e-12)
    # log p(x|target) / p(x|references), the references' probability their mean
    ratio = target[:, 0] - (np.logaddexp.reduce(references[..., 0], axis=0) - np.log(len(references)))
    rmia = (ratio[:, None] > ratio[population][None, :]).mean(axis=1)
    keep = np.ones(len(target), dtype=bool)
    keep[population] = False
    return {"lira": (FINAL, lira[keep]), "rmia": (FINAL, rmia[keep])}


def score_canaries(cfg: ExperimentConfig, views: Views, canaries: list[dict], node_of: np.ndarray,
                   population: list[dict] = ()) -> dict[str, tuple[str, np.ndarray]]:
    """Every attack's scores over `canaries` (node_of: each canary's node): {name: (view, scores)}."""
    assembled = build_model(cfg.model, cfg.peft, len(cfg.data.labels), cfg.seed)
    initial = get_trainable(assembled.model)
    examples = _examples(cfg, canaries)
    before = _losses(assembled, examples)
    scores: dict[str, tuple[str, np.ndarray]] = {}
    if cfg.peft.method != "full":
        shared = [n for n in assembled.trainable_names() if n in views.released]
        fit = GradientFit(assembled, examples, shared, cfg.dp.max_grad_norm)
        scores["update"] = (FINAL, fit.scores({n: np.asarray(views.released[n]) - initial[n] for n in views.released}))
        if views.aggregates:
            rounds = sorted(views.aggregates)
            scores["aggregates"] = (COORDINATOR, sum(fit.scores(views.aggregates[r]) for r in rounds))
            if len(rounds) > 1:
                scores["first-round"] = (COORDINATOR, fit.scores(views.aggregates[rounds[0]]))
    everyone = examples + _examples(cfg, list(population))
    target = _confidence(_under(assembled, initial, views.released), everyone)
    after = -target[:len(examples), 0]
    scores = {"loss": (FINAL, -after), "calibrated": (FINAL, before - after), **scores}
    if views.references and len(population):
        references = []
        for seed, arrays in views.references:  # each from its own initial model (its head, a tiny backbone)
            own = build_model(cfg.model, cfg.peft, len(cfg.data.labels), seed)
            references.append(_confidence(_under(own, get_trainable(own.model), arrays), everyone))
        scores.update(_reference_scores(target, np.stack(references), slice(len(examples), None)))
    if views.personalized:
        own_loss = np.full(len(examples), np.nan)
        for node, arrays in views.personalized.items():
            mine = np.flatnonzero(node_of == node)
            if len(mine):
                own_loss[mine] = _losses(_under(assembled, initial, arrays), [examples[i] for i in mine])
        if not np.isnan(own_loss).any():  # every node kept a personalized model
            scores["personalized"] = (NODE, before - own_loss)
    return scores
