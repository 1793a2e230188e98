"""A run's result in standard formats: a PEFT adapter PeftModel loads, a model a pipeline runs."""

import json

import pytest
import torch

import securefpt
from securefpt.engines.runner import run_experiment
from securefpt.experiment.loading import load_config
from securefpt.learning.adapter import HEAD_FILE
from securefpt.learning.artifacts import load_arrays
from securefpt.learning.backbone import load_backbone, load_tokenizer
from securefpt.predict import predict
from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

TEXTS = ["match goal coach 3", "vote election minister 4", "hospital vaccine 5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short centralized run per PEFT method (no federation needed to make an artifact)."""
    tmp = tmp_path_factory.mktemp("artifacts")
    root = make_masakhanews_like(tmp / "data", ["aa", "bb"])
    out = {}
    for method in ("prompt_tuning", "p_tuning", "lora"):
        cfg = load_config(None, TINY + tsv_cfg_overrides(root, ["aa", "bb"]) + [
            "paradigm=centralized", f"peft.method={method}", "fl.lr=0.3"])
        run_experiment(cfg, tmp / method, show_progress=False)
        out[method] = (cfg, tmp / method)
    return out


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "lora"])
def test_the_adapter_loads_with_peft_and_classifies_as_securefpt_predict_does(runs, method):
    from peft import PeftModel

    cfg, run = runs[method]
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "lora": "LORA"}[method]
    tokenizer = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_backbone(cfg.model, len(tokenizer), cfg.seed), str(run)).eval()
    head = load_arrays(run / HEAD_FILE)
    virtual = 0 if method == "lora" else cfg.peft.num_virtual_tokens
    enc = tokenizer(TEXTS, truncation=True, max_length=cfg.model.max_length - virtual, padding=True,
                    return_tensors="pt")
    with torch.no_grad():  # mean pooling over the virtual tokens and the text, then the head: by hand
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = torch.cat([torch.ones(len(TEXTS), virtual), enc["attention_mask"]], dim=1).unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        probs = torch.softmax(pooled @ torch.as_tensor(head["head.weight"]).T + torch.as_tensor(head["head.bias"]), -1)
    labels = json.loads((run / "labels.json").read_text())
    by_hand = [(labels[int(p.argmax())], float(p.max())) for p in probs]
    got = predict(run, TEXTS)
    assert [label for label, _ in got] == [label for label, _ in by_hand]
    assert [p for _, p in got] == pytest.approx([p for _, p in by_hand], abs=1e-5)


def test_load_classifier_works_in_a_transformers_pipeline(runs):
    from transformers import pipeline

    _, run = runs["prompt_tuning"]
    clf = securefpt.load_classifier(run)
    results = pipeline("text-classification", model=clf, tokenizer=clf.tokenizer)(TEXTS)
    assert [(r["label"], pytest.approx(r["score"], abs=1e-5)) for r in results] == predict(run, TEXTS)
    assert clf.config.id2label == dict(enumerate(json.loads((run / "labels.json").read_text())))


@pytest.mark.parametrize("name, portable", [("builtin:tiny", "builtin:tiny"),
                                            ("builtin:minilm", "sentence-transformers/all-MiniLM-L6-v2")])
def test_the_adapter_names_its_base_portably_and_its_card_states_the_runs_facts(tmp_path, name, portable):
    """No path inside this machine's environment in adapter_config.json (a hub id where the weights
    are the hub's, else the builtin name securefpt resolves); README.md is the run's card, not
    PEFT's empty template."""
    from securefpt.learning.adapter import save_classifier
    from securefpt.learning.modeling import build_model, get_trainable

    cfg = load_config(None, TINY + [f"model.name={name}"])
    model = build_model(cfg.model, cfg.peft, 3, 0)
    save_classifier(tmp_path, cfg.model, cfg.peft, get_trainable(model.model), ["a", "b", "c"], 0)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == portable


def test_a_runs_model_card_states_task_languages_base_model_privacy_and_decisions(runs):
    _, run = runs["prompt_tuning"]
    summary = json.loads((run / "summary.json").read_text())
    card = (run / "README.md").read_text()
    assert "More Information Needed" not in card  # PEFT's template is gone
    for fact in [f"base_model: {summary['model']}", "classify into " + ", ".join(summary["labels"]),
                 "**Languages**: aa, bb", "prompt_tuning", "no differential privacy guarantee",
                 summary["audit_head"], "a tiny random BERT built in code (tests)"]:
        assert fact in card, fact
    for lang, value in summary["final"]["accuracy"].items():
        if lang != "avg":
            assert f"| {lang} | {value:.3f} |" in card
