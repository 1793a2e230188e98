"""End to end with the packaged MiniLM on a slice of the real MasakhaNEWS data."""

import pytest

from securefpt.engines.runner import run_experiment
from securefpt.experiment.loading import load_config
from securefpt.predict import predict
from tests.conftest import expected_predictions

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
    # 3 rounds of 48 examples per node: the English node, whose language MiniLM knows, must
    # beat the 1/7 chance level clearly (0.3 is over 4 standard deviations above it on 48 rows)
    assert acc["eng"] > 0.3
    # secure aggregation is on by default: no node's training loss reaches the coordinator
    assert summary["secure_aggregation"]["enabled"] is True
    assert all(r["train_loss"] is None for r in summary["rounds"])
    assert summary["secure_aggregation"]["aborted_rounds"] == []
    assert summary["trainable_params"] == 8 * 384 + 384 * 7 + 7
    texts = ["Manchester United win the league after a late goal", "Parliament passes the budget"]
    trained, untrained = expected_predictions(tmp_path / "run", texts)
    got = predict(tmp_path / "run", texts)
    assert [label for label, _ in got] == [label for label, _ in trained]
    assert [p for _, p in got] == pytest.approx([p for _, p in trained], abs=1e-5)
    assert [p for _, p in got] != pytest.approx([p for _, p in untrained], abs=1e-3)
