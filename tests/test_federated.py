"""Federated runs through Flower's simulation engine with the tiny model (local trial nodes)."""

import json

import numpy as np
import pytest

from securefpt.coordinator.checkpoint import RunState
from securefpt.coordinator.run_dir import RoundRecord
from securefpt.coordinator.summary import RunSummary
from securefpt.engines.runner import run_experiment
from securefpt.experiment.config import ExperimentConfig
from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.artifacts import load_arrays
from securefpt.learning.modeling import build_model, get_trainable, set_trainable
from securefpt.learning.training import evaluate, train_local
from tests.conftest import make_masakhanews_like, tsv_cfg_overrides

LANGS = ["aa", "bb", "cc"]


@pytest.fixture
def fed_cfg(tmp_path, tiny_overrides):
    root = make_masakhanews_like(tmp_path / "data", LANGS)  # 10, 14, 18 training rows
    return load_config(None, tiny_overrides + tsv_cfg_overrides(root, LANGS) + [
        "secagg.enabled=false",  # plaintext Algorithm 1; the secure path is tested against it
    ])


def reference_algorithm_1(cfg):
    """Algorithm 1 replayed in-process from the learning primitives alone (no node, no coordinator
    code): each client trains from h_g on its own data; h_g <- sum_k |D_k|/sum_j |D_j| h_k.
    The encoders after each round, and each round's per-language accuracy."""
    labels = label_space(cfg.data)
    models = {lang: build_model(cfg.model, cfg.peft, len(labels), cfg.seed) for lang in cfg.data.languages}
    data = {lang: load_client_data(cfg.data, lang, labels, cfg.seed) for lang in cfg.data.languages}
    h_g = get_trainable(models["aa"].model)
    encoders, accuracies = [], []
    for server_round in range(1, cfg.fl.rounds + 1):
        updates = []
        for lang, assembled in models.items():
            set_trainable(assembled.model, h_g)
            train_local(assembled, data[lang].train, cfg.training_plan(), cfg.seed * 100_003 + server_round)
            updates.append((get_trainable(assembled.model), len(data[lang].train)))
        total = sum(n for _, n in updates)
        h_g = {k: sum(np.float64(n) / total * u[k].astype(np.float64) for u, n in updates).astype(np.float32)
               for k in h_g}
        encoders.append(h_g)
        acc = {}
        for lang, assembled in models.items():
            set_trainable(assembled.model, h_g)
            acc[lang] = evaluate(assembled, data[lang].eval, cfg.fl.eval_batch_size).accuracy
        accuracies.append(acc)
    return encoders, accuracies


def test_two_round_federated_run_equals_algorithm_1(fed_cfg, tmp_path):
    # a 32-token prompt, so the encoder's bytes dominate each message's framing
    cfg = fed_cfg.model_copy(update={"peft": fed_cfg.peft.model_copy(update={"num_virtual_tokens": 32}),
                                     "model": fed_cfg.model.model_copy(update={"max_length": 64})})
    out = tmp_path / "run"
    summary = run_experiment(cfg, out, show_progress=False)

    # the run directory interface
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in ("metrics.csv", "accuracy.png", "prompt_encoder.safetensors", "config.yaml", "audit.jsonl"):
        assert (out / name).is_file(), name
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["clients"]["bb"] == {"region": None, "language": "bb", "included": True, "reason": "eligible"}
    assert summary["privacy"]["epsilon"] == {"aa": None, "bb": None, "cc": None}
    assert summary["secure_aggregation"]["enabled"] is False
    # summary.json is a RunSummary (coordinator/summary.py), the typed schema other tools read
    assert RunSummary.read(out / "summary.json").to_dict() == summary
    assert "personalized_accuracy" not in summary["final"]  # only personalized runs carry it
    assert summary["stopped_before_the_last_round"] is None and summary["stopped_by_refusals"] is False

    # only trainable parameters travel and are saved
    saved = load_arrays(out / "prompt_encoder.safetensors")
    assert set(saved) == {"prompt_encoder.embedding.weight", "head.weight", "head.bias"}
    payload = 4 * sum(a.size for a in saved.values())  # float32 bytes of one encoder
    assert summary["trainable_params"] * 4 == payload and payload > 4000
    # bytes are measured from the serialized messages. Per round each of 3 nodes gets two
    # messages holding the encoder (train; evaluate with the next offer) and sends two back,
    # one holding its encoder (the training reply; the evaluation reply holds metrics only).
    # Framing (record keys, names, shapes, metadata) does not grow with the payload; 1,000
    # bytes a message bounds it with room and is less than the payload, so an encoder sent
    # twice or as float64 breaks the bound.
    for r in summary["rounds"]:
        assert 6 * payload <= r["bytes_down"] <= 6 * (payload + 1000), r["bytes_down"]
        assert 3 * payload <= r["bytes_up"] <= 3 * payload + 6 * 1000, r["bytes_up"]

    # the result equals Algorithm 1 computed independently, encoder and every accuracy
    encoders, accuracies = reference_algorithm_1(cfg)
    for name, value in encoders[-1].items():
        np.testing.assert_allclose(saved[name], value, atol=1e-5, err_msg=name)
    for r, acc in zip(summary["rounds"], accuracies):
        assert {k: v for k, v in r["accuracy"].items() if k != "avg"} == pytest.approx(acc)


def test_a_node_that_fails_setup_is_excluded_and_the_run_goes_on(tmp_path, tiny_overrides):
    root = make_masakhanews_like(tmp_path / "data", LANGS, missing=("cc",))
    cfg = load_config(None, tiny_overrides + tsv_cfg_overrides(root, LANGS) + ["fl.rounds=1",
                                                                              "secagg.enabled=false"])
    # the operator's own trial nodes are checked before the engine starts: cc's file is missing
    from securefpt.errors import DataError

    with pytest.raises(DataError, match=r"cc/test.tsv: file not found"):
        run_experiment(cfg, tmp_path / "never", show_progress=False)
    assert not (tmp_path / "never" / "summary.json").exists()


@pytest.mark.parametrize("paradigm", ["monolingual", "centralized"])
def test_local_paradigms_train_what_they_say(paradigm, fed_cfg, tmp_path):
    summary = run_experiment(fed_cfg.model_copy(update={"paradigm": paradigm}), tmp_path / paradigm,
                             show_progress=False)
    assert summary["paradigm"] == paradigm and len(summary["rounds"]) == 2
    assert summary["communication"]["bytes_up"] == summary["communication"]["bytes_down"] == 0
    cfg = fed_cfg
    labels = label_space(cfg.data)
    data = {lang: load_client_data(cfg.data, lang, labels, cfg.seed) for lang in LANGS}
    if paradigm == "monolingual":  # each language alone, from the same start
        for pid, lang in enumerate(LANGS):
            ref = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
            for block in (1, 2):
                train_local(ref, data[lang].train, cfg.training_plan(), cfg.seed * 100_003 + block * 1_009 + pid)
            got = load_arrays(tmp_path / paradigm / "languages" / lang / "prompt_encoder.safetensors")
            for name, value in get_trainable(ref.model).items():
                np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=f"{lang} {name}")
    else:  # one model on the pooled data of every language
        ref = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
        pooled = [ex for lang in LANGS for ex in data[lang].train]
        for block in (1, 2):
            train_local(ref, pooled, cfg.training_plan(), cfg.seed * 100_003 + block * 1_009)
        got = load_arrays(tmp_path / paradigm / "prompt_encoder.safetensors")
        for name, value in get_trainable(ref.model).items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)


def _record(r, avg):
    return RoundRecord(round=r, accuracy={"aa": avg}, seconds=0.0)


def test_a_local_baseline_of_a_distributed_dp_experiment_runs_and_says_it_ran_without_dp(fed_cfg, tmp_path):
    """A study's monolingual cell of a distributed-DP experiment (its noise planned only for federated
    runs): the baseline trains without DP and its run directory's request says so."""
    cfg = ExperimentConfig.model_validate({**fed_cfg.model_dump(), "paradigm": "monolingual",
                                           "dp": {"enabled": True, "mode": "distributed", "target_epsilon": 8},
                                           "secagg": {"enabled": True}, "fl": {**fed_cfg.fl.model_dump(), "rounds": 1}})
    summary = run_experiment(cfg, tmp_path / "run", show_progress=False)
    assert summary["paradigm"] == "monolingual" and summary["final"]["accuracy"]["avg"] >= 0
    request = json.loads((tmp_path / "run" / "request.json").read_text())
    assert request["dp"]["enabled"] is False


def test_early_stopping_tracks_the_best_round_and_resets_patience():
    state = RunState(global_arrays={})
    decisions = []
    for r, acc in enumerate([0.3, 0.2, 0.4, 0.35, 0.3], start=1):
        state.rounds.append(_record(r, acc))
        decisions.append(state.observe(state.rounds[-1], {"w": np.array([r])}, patience=2))
    # round 2 is worse (stale 1), round 3 beats round 1 (stale resets), 4 and 5 are worse: stop after 5
    assert decisions == [False, False, False, False, True]
    assert state.best_round == 3 and state.best_arrays["w"][0] == 3


def test_early_stopping_saves_the_best_round_not_the_last(fed_cfg, tmp_path):
    cfg = fed_cfg.model_copy(update={"fl": fed_cfg.fl.model_copy(update={"rounds": 6, "patience": 1, "lr": 0.3})})
    summary = run_experiment(cfg, tmp_path / "run", show_progress=False)
    avgs = [r["accuracy"]["avg"] for r in summary["rounds"]]
    best = int(np.argmax(avgs)) + 1
    # patience 1: the run stopped right after the first round that did not improve
    assert len(avgs) < 6 and avgs[-1] <= max(avgs[:-1]) and best != len(avgs)
    assert summary["final"]["round"] == best
    encoders, _ = reference_algorithm_1(cfg)
    saved = load_arrays(tmp_path / "run" / "prompt_encoder.safetensors")
    for name, value in encoders[best - 1].items():
        np.testing.assert_allclose(saved[name], value, atol=1e-5, err_msg=name)


def test_tensorboard_tracking_records_every_round(fed_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = fed_cfg.model_copy(update={"tensorboard": True})
    summary = run_experiment(cfg, tmp_path / "run", show_progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    accuracy = [e.value for e in events.Scalars("accuracy/avg")]
    assert accuracy == pytest.approx([r["accuracy"]["avg"] for r in summary["rounds"]])
    assert [e.value for e in events.Scalars("bytes/up")] == [r["bytes_up"] for r in summary["rounds"]]
    assert {t for t in events.Tags()["scalars"]} >= {"accuracy/aa", "accuracy/bb", "accuracy/cc", "bytes/down"}
