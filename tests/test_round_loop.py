"""The round loop's behaviour on an in-process grid (tests/local_grid.py): the real ServerApp, the
real ClientApp and real SecAgg+, no engine, so a whole run takes about two seconds."""

from collections import Counter

from flwr.app import MessageType

from securefpt.experiment.loading import load_config
from securefpt.node.app import app as node_app
from securefpt.protocol.records import WITNESS_QUERY
from tests.conftest import make_masakhanews_like
from tests.local_grid import run_in_process

LANGS = ["aa", "bb", "cc"]


def _cfg(tmp_path, *extra):
    root = make_masakhanews_like(tmp_path / "data", LANGS)
    return load_config(None, [f"data.root={root}", "data.source=masakhanews_tsv", "data.train_split=test",
                              "data.eval_split=dev", "data.languages=[aa, bb, cc]", "data.max_train_per_client=8",
                              "model.name=builtin:tiny", "model.max_length=32", "peft.num_virtual_tokens=4",
                              "fl.rounds=2", *extra])


def test_a_secure_round_is_six_exchanges_and_each_node_gets_each_stage_once(tmp_path):
    summary, grid = run_in_process(_cfg(tmp_path), tmp_path / "run")
    assert [r["exchanges"] for r in summary["rounds"]] == [6, 6]
    assert all(r["participants"] == LANGS and not r["failures"] for r in summary["rounds"])
    per_node = Counter((m.metadata.dst_node_id, m.metadata.message_type) for m in grid.delivered)
    for node in grid.node_ids:
        # setup, the first offer, two rounds of (5 SecAgg+ exchanges and an evaluation that offers the next
        # round), the final witness
        assert per_node[(node, MessageType.TRAIN)] == 2 * 5
        assert per_node[(node, MessageType.EVALUATE)] == 1 + 2
        assert per_node[(node, MessageType.QUERY)] == 1  # setup
        assert per_node[(node, WITNESS_QUERY)] == 1  # the final audit head (no personalization was asked)
        assert sum(n for (dst, _), n in per_node.items() if dst == node) == 1 + 1 + 2 * 6 + 1


def test_a_node_whose_training_fails_is_a_dropout_of_that_round_only(tmp_path):
    """bb's training handler raises in round 1: the coordinator records it as that round's dropout
    (an error reply), aggregates the others, and bb trains again in round 2."""
    failed = []

    def flaky(message, context):
        if message.metadata.message_type == MessageType.TRAIN and context.node_config["partition-id"] == 1 \
                and not failed:
            failed.append(message.metadata.message_id)
            raise RuntimeError("disk full")
        return node_app(message, context)

    summary, _ = run_in_process(_cfg(tmp_path, "secagg.enabled=false"), tmp_path / "run", client_app=flaky)
    r1, r2 = summary["rounds"]
    assert r1["participants"] == ["aa", "cc"] and len(r1["failures"]) == 1 and r1["failures"][0].startswith("bb")
    assert r2["participants"] == LANGS and not r2["failures"]
    assert [r["exchanges"] for r in summary["rounds"]] == [2, 2]
