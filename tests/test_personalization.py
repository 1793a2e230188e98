"""Personalization, server optimizers and FedProx, end to end through Flower's simulation engine.

A plaintext run with a local head (FedPer), local adaptation, FedAvgM on the server and
FedProx on the nodes is replayed in-process from the learning primitives alone; the run's
global encoder, every node's head and personalized model, and the accuracies in
`summary.json` must equal the replay. Then a hostile coordinator tries to use the
`personalize` query as an oracle.
"""

import json
from collections import OrderedDict

import numpy as np
import pytest

from securefpt.engines.runner import run_experiment
from securefpt.engines.simulation import run_federated_simulation
from securefpt.engines.trial_nodes import write_trial_nodes
from securefpt.errors import ConfigError
from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.artifacts import load_arrays
from securefpt.learning.classifier import load_classifier
from securefpt.learning.modeling import build_model, get_trainable, set_trainable
from securefpt.learning.training import evaluate, train_local
from securefpt.node.personal import Personal
from securefpt.predict import predict
from tests.attacks import hostile_app
from tests.conftest import make_masakhanews_like, tsv_cfg_overrides
from tests.test_cli import securefpt

pytestmark = pytest.mark.slow
LANGS = ["aa", "bb", "cc"]
MU, MOMENTUM, ADAPT_EPOCHS, ADAPT_LR = 0.5, 0.5, 2, 2e-2


@pytest.fixture
def cfg(tmp_path, tiny_overrides):
    root = make_masakhanews_like(tmp_path / "data", LANGS)
    return load_config(None, tiny_overrides + tsv_cfg_overrides(root, LANGS) + [
        "secagg.enabled=false", "fl.lr=0.05", f"fl.proximal_mu={MU}",
        "fl.server_optimizer.name=fedavgm", f"fl.server_optimizer.momentum={MOMENTUM}",
        "personalization.local_head=true", f"personalization.adapt_epochs={ADAPT_EPOCHS}",
        f"personalization.adapt_lr={ADAPT_LR}"])


def replay(cfg):
    """FedPer + FedAvgM + FedProx + local adaptation, from the primitives: each client trains from
    (h_g, its own head); only the encoder is averaged; h_g moves by lr * momentum buffer."""
    labels = label_space(cfg.data)
    models = {lang: build_model(cfg.model, cfg.peft, len(labels), cfg.seed) for lang in LANGS}
    data = {lang: load_client_data(cfg.data, lang, labels, cfg.seed) for lang in LANGS}
    start = get_trainable(models["aa"].model)
    h_g = OrderedDict((k, v) for k, v in start.items() if not k.startswith("head."))
    heads = {lang: {k: v for k, v in start.items() if k.startswith("head.")} for lang in LANGS}
    momentum = None
    for server_round in range(1, cfg.fl.rounds + 1):
        updates = []
        for lang, assembled in models.items():
            set_trainable(assembled.model, {**h_g, **heads[lang]})
            train_local(assembled, data[lang].train, cfg.training_plan(), cfg.seed * 100_003 + server_round)
            trained = get_trainable(assembled.model)
            heads[lang] = {k: v for k, v in trained.items() if k.startswith("head.")}
            updates.append((trained, len(data[lang].train)))
        total = sum(n for _, n in updates)
        change = {k: sum(n / total * u[k].astype(np.float64) for u, n in updates) - h_g[k] for k in h_g}
        momentum = change if momentum is None else {k: MOMENTUM * momentum[k] + change[k] for k in h_g}
        h_g = OrderedDict((k, (h_g[k] + momentum[k]).astype(np.float32)) for k in h_g)
    adapted, accuracy = {}, {}
    plan = cfg.training_plan().model_copy(update={"local_epochs": ADAPT_EPOCHS, "lr": ADAPT_LR, "proximal_mu": 0.0})
    for lang, assembled in models.items():
        set_trainable(assembled.model, {**h_g, **heads[lang]})
        train_local(assembled, data[lang].train, plan, cfg.seed * 100_003 + 99_991)
        adapted[lang] = get_trainable(assembled.model)
        accuracy[lang] = evaluate(assembled, data[lang].eval, cfg.fl.eval_batch_size).accuracy
    return h_g, heads, adapted, accuracy, labels


def test_personalized_federation_equals_its_replay_and_keeps_each_head_at_home(cfg, tmp_path):
    out = tmp_path / "run"
    summary = run_experiment(cfg, out, show_progress=False)
    h_g, heads, adapted, accuracy, labels = replay(cfg)

    saved = load_arrays(out / "prompt_encoder.safetensors")
    assert set(saved) == set(h_g)  # no head in the federation's artifact
    for name, value in h_g.items():
        np.testing.assert_allclose(saved[name], value, atol=1e-5, err_msg=name)
    # every node contributed every round: the coordinator takes a training reply only when it
    # holds exactly the shared encoder's arrays, so no reply carried a head
    assert [r["participants"] for r in summary["rounds"]] == [LANGS] * cfg.fl.rounds

    personal = summary["final"]["personalized_accuracy"]
    assert {k: v for k, v in personal.items() if k != "avg"} == pytest.approx(accuracy)
    assert personal["avg"] == pytest.approx(np.mean(list(accuracy.values())))
    request = cfg.request(labels)
    for lang in LANGS:
        kept = Personal(out / "nodes" / lang, request)
        for name, value in heads[lang].items():  # each node's own head, as trained in the last round
            np.testing.assert_allclose(kept.head(heads[lang])[name], value, atol=1e-5, err_msg=f"{lang} {name}")
        model = kept.model()
        for name, value in adapted[lang].items():
            np.testing.assert_allclose(model[name], value, atol=1e-5, err_msg=f"{lang} {name}")
    assert not np.allclose(heads["aa"]["head.weight"], heads["bb"]["head.weight"])  # heads differ per node

    # predict: the federation's artifact has no head; a node's personalized model classifies
    with pytest.raises(ConfigError, match="--node"):
        load_classifier(out)
    texts = ["vote election minister", "hospital vaccine", "match goal coach"]
    reference = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    set_trainable(reference.model, adapted["bb"])
    reference.model.eval()
    enc = reference.tokenizer(texts, truncation=True, max_length=reference.max_text_tokens, padding=True,
                              return_tensors="pt")
    import torch

    with torch.no_grad():
        probs = reference.model(enc["input_ids"], enc["attention_mask"]).softmax(-1)
    got = predict(out, texts, node="bb")  # securefpt.load_classifier(out, node="bb")
    assert [label for label, _ in got] == [labels[int(i)] for i in probs.argmax(-1)]
    assert [p for _, p in got] == pytest.approx([float(p) for p in probs.max(-1).values], abs=1e-5)
    # the command line: the node's model by its state folder; the run's own artifact, refused
    cli = securefpt("predict", str(out), "--node", str(out / "nodes" / "bb"), *texts)
    assert cli.returncode == 0, cli.stderr
    assert [line.split("\t")[0] for line in cli.stdout.splitlines()] == [label for label, _ in got]
    refused = securefpt("predict", str(out), texts[0])
    assert refused.returncode == 2 and "--node" in refused.stderr and "Traceback" not in refused.stderr


def test_monolingual_baseline_gets_the_adaptation_epochs_too(cfg, tmp_path):
    summary = run_experiment(cfg.model_copy(update={"paradigm": "monolingual"}), tmp_path / "mono",
                             show_progress=False)
    assert len(summary["rounds"]) == cfg.fl.rounds + 1  # the rounds' blocks and one of adaptation
    labels = label_space(cfg.data)
    lang = "cc"
    ref = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    train = load_client_data(cfg.data, lang, labels, cfg.seed).train
    plain = cfg.training_plan().model_copy(update={"proximal_mu": 0.0})
    for block, plan in enumerate([plain, plain, plain.model_copy(update={"local_epochs": ADAPT_EPOCHS,
                                                                         "lr": ADAPT_LR})], start=1):
        train_local(ref, train, plan, cfg.seed * 100_003 + block * 1_009 + LANGS.index(lang))
    got = load_arrays(tmp_path / "mono" / "languages" / lang / "prompt_encoder.safetensors")
    for name, value in get_trainable(ref.model).items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)


def test_a_hostile_coordinator_cannot_use_personalization_as_an_oracle(cfg, tmp_path):
    """Personalization happens once, only for an encoder the node evaluated in this run."""
    labels = label_space(cfg.data)
    nodes = write_trial_nodes(cfg, tmp_path / "nodes")
    request = json.loads(cfg.request(labels).to_json())
    unplanned = {**request, "personalization": {"local_head": False, "adapt_epochs": 0, "adapt_lr": None}}
    start = get_trainable(build_model(cfg.model, cfg.peft, len(labels), cfg.seed).model)
    shared = {k: v for k, v in start.items() if not k.startswith("head.")}
    chosen = {k: (v + 0.01).astype(np.float32) for k, v in shared.items()}

    def script(h):
        h.setup("unplanned", unplanned, to=None)
        h.personalize("personalize when not planned", "aa", shared)

    def script2(h):
        h.setup("planned", request)
        h.personalize("personalize chosen parameters", "aa", chosen)
        h.evaluate("evaluate them as a round", "aa", 1, chosen)
        h.personalize("personalize an evaluated encoder", "aa", chosen)
        h.personalize("personalize again", "aa", chosen)

    log: dict = {}
    for i, play in enumerate((script, script2)):
        run_federated_simulation(cfg, tmp_path / f"run-{i}", show_progress=False,
                                 server_app=hostile_app(play, log, len(LANGS)), nodes=nodes)
    assert "error" not in log, log.get("error")
    steps = log["steps"]
    assert steps["personalize when not planned"]["aa"] == "personalization-refused"
    assert steps["personalize chosen parameters"]["aa"] == "personalization-refused"
    assert steps["personalize an evaluated encoder"]["aa"] == "ok"
    assert steps["personalize again"]["aa"] == "personalization-refused"
    accuracy = [records for step, client, _, _, records in log["bytes"] if step == "personalize an evaluated encoder"]
    assert set(accuracy[0]["metric_records.eval"]) == {"accuracy"}  # trial nodes release their metrics


def test_the_terminal_table_shows_the_personalized_accuracy_beside_the_global(tmp_path):
    from rich.console import Console

    from securefpt.engines.report import print_summary

    summary = {"name": "x", "paradigm": "federated", "peft_method": "prompt_tuning",
               "final": {"round": 2, "accuracy": {"aa": 0.5, "bb": 0.25, "avg": 0.375},
                         "personalized_accuracy": {"aa": 0.75, "avg": 0.75}},  # bb releases nothing
               "communication": {"bytes_up": 1, "bytes_down": 2}, "trainable_params": 1, "total_params": 2,
               "clients": {}, "privacy": {"epsilon": {}}, "secure_aggregation": {"enabled": False},
               "audit_log": "a", "audit_public_key": "b"}
    console = Console(record=True, width=120)
    print_summary(summary, tmp_path, console)
    rows = {line.split()[1]: line.split()[2:] for line in console.export_text().splitlines()
            if line.startswith("│") and line.split()[1] in ("aa", "bb", "avg")}
    # as released: 0.5, not 0.500 (a node that rounds to one decimal released 0.5, nothing finer)
    assert rows["aa"][:4] == ["│", "0.5", "│", "0.75"] and rows["bb"][:4] == ["│", "0.25", "│", "-"]


def test_a_node_keeps_the_personalized_models_of_its_newest_experiments_only(tmp_path):
    """Channel 9 (flood): one personalized model per run would grow a node's state with every run a
    coordinator starts. The node keeps its newest `keep_personalized` experiments' folders, the one it
    writes always among them."""
    import os
    import time

    from securefpt.node.personal import Personal

    arrays = {"prompt": np.zeros((4, 8), dtype=np.float32)}
    requests = [load_config(None, [f"name=experiment-{i}"]).request(["a", "b"]) for i in range(5)]
    for i, request in enumerate(requests):
        Personal(tmp_path, request, keep=3).keep_model(arrays)
        folder = tmp_path / "personal" / request.sha256()[:16]
        past = time.time() - 100 + i  # written in order, a second apart
        for path in [folder, *folder.iterdir()]:
            os.utime(path, (past, past))
    kept = sorted(p.name for p in (tmp_path / "personal").iterdir())
    assert kept == sorted(r.sha256()[:16] for r in requests[2:])
    assert Personal(tmp_path, requests[4], keep=3).model() is not None
