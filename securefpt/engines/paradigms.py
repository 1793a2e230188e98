"""The comparison paradigms of the paper (Section 4.2), trained in-process.

- monolingual: each language's client trains alone on its own data;
- centralized: one model on the pooled data of all languages (what federation avoids).

Both get the same budget as a federated node: `fl.rounds` blocks of `fl.local_epochs`
epochs, evaluated per language after each block, and, where the experiment personalizes,
one more block of `personalization.adapt_epochs` epochs at `adapt_lr` (what a federated
node spends adapting the final encoder). No proximal term: there is no global encoder.
"""

from __future__ import annotations

import time
from pathlib import Path

from securefpt.coordinator.progress import RunProgress
from securefpt.coordinator.run_dir import ClientRecord, RoundRecord, RunRecorder
from securefpt.errors import FederationError
from securefpt.experiment.config import ExperimentConfig
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.modeling import build_model, count_params, get_trainable
from securefpt.learning.training import evaluate, train_local


def run_local_paradigm(cfg: ExperimentConfig, out_dir: Path, show_progress: bool = True) -> dict:
    if cfg.policy is not None and cfg.paradigm == "centralized":
        raise FederationError(f"the residency policy {cfg.policy.name} forbids the centralized paradigm: "
                              "it pools every client's raw data in one place")
    labels = label_space(cfg.data)
    no_dp = cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"enabled": False})})  # local baselines run no DP
    recorder = RunRecorder(out_dir, cfg, no_dp.request(labels))
    try:
        return _train(cfg, labels, recorder, show_progress)
    finally:
        recorder.audit.close()


def _train(cfg: ExperimentConfig, labels: list[str], recorder: RunRecorder, show_progress: bool) -> dict:
    data = {lang: load_client_data(cfg.data, lang, labels, cfg.seed) for lang in cfg.data.languages}
    if cfg.paradigm == "monolingual":
        models = {lang: build_model(cfg.model, cfg.peft, len(labels), cfg.seed) for lang in data}
    else:
        shared = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
        models = {lang: shared for lang in data}
        pooled = [ex for d in data.values() for ex in d.train]
    adapt = cfg.personalization
    blocks = [cfg.training_plan().model_copy(update={"proximal_mu": 0.0})] * cfg.fl.rounds
    if adapt.adapt_epochs:
        blocks.append(blocks[0].model_copy(update={"local_epochs": adapt.adapt_epochs,
                                                   "lr": adapt.adapt_lr or cfg.fl.lr}))
    progress = RunProgress(enabled=show_progress)
    progress.start(len(blocks), label=f"{cfg.paradigm} blocks")
    for block, plan in enumerate(blocks, start=1):
        start = time.perf_counter()
        losses = []
        seed = cfg.seed * 100_003 + block * 1_009
        if cfg.paradigm == "monolingual":
            task = progress.clients(f"block {block}: training", len(data))
            for pid, (lang, d) in enumerate(data.items()):
                losses.append(train_local(models[lang], d.train, plan, seed + pid).loss)
                task.advance()
            task.done()
        else:
            losses.append(train_local(shared, pooled, plan, seed).loss)
        accuracy = {
            lang: evaluate(models[lang], d.eval, cfg.fl.eval_batch_size).accuracy for lang, d in data.items()
        }
        record = RoundRecord(round=block, accuracy=accuracy, seconds=time.perf_counter() - start,
                             participants=list(data), train_loss=sum(losses) / len(losses))
        recorder.add_round(record)
        progress.round_done(record)
    progress.stop()

    if cfg.paradigm == "monolingual":
        for lang, assembled in models.items():
            recorder.save_artifact(get_trainable(assembled.model), language=lang)
    else:
        recorder.save_artifact(get_trainable(shared.model))
    trainable, total = count_params(next(iter(models.values())).model)
    clients = {
        lang: ClientRecord(region=None, language=lang, included=True, reason=f"{cfg.paradigm} (no federation)")
        for lang in data
    }
    return recorder.write_summary(recorder.rounds[-1], trainable, total, clients)
