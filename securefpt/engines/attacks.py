"""The attacker's scores for each canary, from what a real adversary holds (a higher score: "it was in").

- `loss` (final model): minus the canary's loss under the released global encoder.
- `calibrated` (final model): the loss drop from the initial encoder (public: every party
  builds it from the experiment's seed) to the released one; a reference model that
  cancels how hard each canary is anyway (Watson et al. 2022; the idea LiRA and RMIA
  build on, here with the one reference every party has).
- `update` (aggregates): the coordinator's view. The released change theta_T - theta_0 is
  the sum of the aggregates it unmasked (after its optimizer). The attacker knows every
  canary (not the coins) and asks which of their clipped gradients at theta_0 add up to
  it: a least-squares fit, each canary's coefficient its score (not for full fine-tuning,
  whose per-example gradients Opacus cannot take).
A local head is not released: the attacker scores with the initial head in its place.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from securefpt.experiment.config import ExperimentConfig
from securefpt.learning.data import Example
from securefpt.learning.modeling import AssembledModel, build_model, get_trainable, set_trainable


def _examples(cfg: ExperimentConfig, canaries: list[dict]) -> list[Example]:
    index = {name: i for i, name in enumerate(cfg.data.labels)}
    return [Example(text=c["text"], label=index[c["label"]]) for c in canaries]


@torch.no_grad()
def _losses(assembled: AssembledModel, examples: list[Example], batch: int = 64) -> np.ndarray:
    model = assembled.model
    model.eval()
    out = []
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        enc = assembled.encode(chunk)
        logits = model(enc["input_ids"], enc["attention_mask"]).float().cpu()
        out.append(nn.functional.cross_entropy(logits, torch.tensor([e.label for e in chunk]), reduction="none"))
    return torch.cat(out).numpy().astype(np.float64)


def _least_squares(assembled: AssembledModel, examples: list[Example], change: dict, clip: float,
                   chunk: int = 64) -> np.ndarray:
    """Which canaries' gradients add up to the change: b = argmin |change + G^T b|^2 + lam |b|^2, G the
    canaries' clipped gradients at theta_0 (rows), lam 1% of their mean squared norm. A sum of clipped
    gradients (one DP-FedSGD round, without noise) is recovered nearly exactly; DP noise hides it."""
    from securefpt.learning.distributed_dp import per_example_gradients

    names = [n for n in assembled.trainable_names() if n in change]
    target = np.concatenate([np.asarray(change[n], dtype=np.float64).ravel() for n in names])
    rows = []
    for start in range(0, len(examples), chunk):
        grads = per_example_gradients(assembled, examples[start:start + chunk], names)
        grads *= np.minimum(1.0, clip / np.maximum(np.linalg.norm(grads, axis=1), 1e-12))[:, None]
        rows.append(grads.astype(np.float32))
    gradients = np.concatenate(rows).astype(np.float64)
    gram = gradients @ gradients.T
    lam = 0.01 * np.trace(gram) / len(gram)
    return -np.linalg.solve(gram + lam * np.eye(len(gram)), gradients @ target)


def score_canaries(cfg: ExperimentConfig, released: dict, canaries: list[dict]) -> dict[str, tuple[str, np.ndarray]]:
    """Every attack's scores: {name: (view, scores)}."""
    assembled = build_model(cfg.model, cfg.peft, len(cfg.data.labels), cfg.seed)
    initial = get_trainable(assembled.model)
    examples = _examples(cfg, canaries)
    before = _losses(assembled, examples)
    change = {n: np.asarray(released[n]) - initial[n] for n in released}
    scores = {}
    if cfg.peft.method != "full":  # Opacus has no per-example gradients of a whole BERT's embeddings
        scores["update"] = ("aggregates", _least_squares(assembled, examples, change, cfg.dp.max_grad_norm))
    set_trainable(assembled.model, {**initial, **released})
    after = _losses(assembled, examples)
    return {"loss": ("final model", -after), "calibrated": ("final model", before - after), **scores}
