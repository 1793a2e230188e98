"""End to end with the packaged MiniLM on a slice of the real MasakhaNEWS data."""


import pytest

from securefpt.config import load_config
from securefpt.learning.predict import predict
from securefpt.engines.runner import run_experiment

pytestmark = pytest.mark.slow


def test_federated_prompt_tuning_on_masakhanews_with_minilm(masakhanews_root, tmp_path):
    cfg = load_config(None, [
        "model.name=builtin:minilm", "model.max_length=64",
        "data.source=masakhanews_tsv", f"data.root={masakhanews_root}",
        "data.languages=[eng, hau, yor]", "data.train_split=test", "data.eval_split=dev",
        "data.max_train_per_client=48", "data.max_eval_per_client=48",
        "fl.rounds=3", "fl.lr=0.01",
    ])
    summary = run_experiment(cfg, tmp_path / "run", show_progress=False)
    assert len(summary["labels"]) == 7
    acc = summary["final"]["accuracy"]
    assert set(acc) == {"eng", "hau", "yor", "avg"}
    # 3 rounds of 48 examples per client: the English client, whose language MiniLM
    # knows, must beat the 1/7 chance level clearly
    assert acc["eng"] > 0.3
    # secure aggregation is on by default: no client's training loss reaches the server
    assert summary["secure_aggregation"]["enabled"] is True
    assert all(r["train_loss"] is None for r in summary["rounds"])
    assert summary["secure_aggregation"]["aborted_rounds"] == []
    assert summary["trainable_params"] == 8 * 384 + 384 * 7 + 7
    [(label, prob)] = predict(tmp_path / "run", ["Manchester United win the league after a late goal"])
    assert label in summary["labels"] and prob > 1 / 7
