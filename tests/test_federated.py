"""Federated runs through Flower's simulation engine with the tiny model."""

import json

import numpy as np
import pytest

from securefpt.aggregation import weighted_average
from securefpt.client_runtime import ClientRuntime
from securefpt.config import load_config
from securefpt.data import label_space
from securefpt.modeling import build_model, get_trainable
from securefpt.results import load_arrays
from securefpt.runner import run_experiment

TSV_HEAD = "category\theadline\ttext\turl\n"


def make_masakhanews_like(root, languages, missing=()):
    """A small MasakhaNEWS-shaped tree; languages in `missing` have labels but no TSVs."""
    words = {"sports": "match goal coach", "politics": "vote election minister", "health": "hospital vaccine"}
    for li, lang in enumerate(languages):
        folder = root / lang
        folder.mkdir(parents=True)
        (folder / "labels.txt").write_text("\n".join(words), encoding="utf-8")
        if lang in missing:
            continue
        for split, n in (("test", 10 + 4 * li), ("dev", 6)):
            rows = [TSV_HEAD]
            for i in range(n):
                label = list(words)[i % 3]
                rows.append(f'{label}\t{lang} news {i}\t"{words[label]} {i}\nmore text"\thttp://x/{i}\n')
            (folder / f"{split}.tsv").write_text("".join(rows), encoding="utf-8")
    return root


@pytest.fixture
def fed_cfg(tmp_path, tiny_overrides):
    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb", "cc"])
    return load_config(None, tiny_overrides + [
        "data.source=masakhanews_tsv", f"data.root={root}", "data.languages=[aa, bb, cc]",
        "data.train_split=test", "data.eval_split=dev", "data.max_train_per_client=null",
        "secagg.enabled=false",  # plaintext Algorithm 1; the secure path is tested against it
    ])


def reference_algorithm_1(cfg):
    """Algorithm 1 replayed in-process, client by client, without Flower."""
    labels = label_space(cfg.data)
    global_arrays = get_trainable(build_model(cfg.model, cfg.peft, len(labels), cfg.seed).model)
    runtimes = [ClientRuntime(cfg, lang, labels) for lang in cfg.data.languages]
    for server_round in range(1, cfg.fl.rounds + 1):
        updates = []
        for pid, rt in enumerate(runtimes):
            arrays, result = rt.fit(global_arrays, server_round, seed_offset=pid)
            updates.append((arrays, result.num_examples))
        global_arrays = weighted_average(updates)
    return global_arrays, {rt.language: rt.evaluate(global_arrays).accuracy for rt in runtimes}


def test_two_round_federated_run_equals_algorithm_1(fed_cfg, tmp_path):
    out = tmp_path / "run"
    summary = run_experiment(fed_cfg, out, show_progress=False)

    # the run directory interface
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    for name in ("metrics.csv", "accuracy.png", "prompt_encoder.safetensors", "config.yaml", "audit.jsonl"):
        assert (out / name).is_file(), name
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert set(summary["final"]["accuracy"]) == {"aa", "bb", "cc", "avg"}
    assert all(0.0 <= v <= 1.0 for v in summary["final"]["accuracy"].values())
    assert summary["clients"]["bb"] == {"region": None, "language": "bb", "included": True, "reason": "eligible"}
    assert summary["privacy"]["epsilon"] == {"aa": None, "bb": None, "cc": None}
    assert summary["secure_aggregation"]["enabled"] is False

    # only trainable parameters travel and are saved
    saved = load_arrays(out / "prompt_encoder.safetensors")
    assert set(saved) == {"prompt_encoder.embedding.weight", "head.weight", "head.bias"}
    n_floats = sum(a.size for a in saved.values())
    assert summary["trainable_params"] == n_floats < summary["total_params"] / 100
    # bytes are measured from the serialized messages: each round sends the encoder
    # down to 3 clients twice (train + evaluate) and gets 3 encoders back
    r1 = summary["rounds"][0]
    assert 6 * n_floats * 4 < r1["bytes_down"] < 6 * n_floats * 4 + 20_000
    assert 3 * n_floats * 4 < r1["bytes_up"] < 3 * n_floats * 4 + 20_000

    # the result equals Algorithm 1 computed independently
    expected, accuracy = reference_algorithm_1(fed_cfg)
    for name, value in expected.items():
        np.testing.assert_allclose(saved[name], value, atol=1e-5, err_msg=name)
    assert summary["final"]["accuracy"]["aa"] == pytest.approx(accuracy["aa"])


def test_a_client_that_fails_setup_is_excluded_and_the_run_goes_on(tmp_path, tiny_overrides):
    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb", "cc"], missing=("cc",))
    cfg = load_config(None, tiny_overrides + [
        "data.source=masakhanews_tsv", f"data.root={root}", "data.languages=[aa, bb, cc]",
        "data.train_split=test", "data.eval_split=dev", "fl.rounds=1",
    ])
    summary = run_experiment(cfg, tmp_path / "run", show_progress=False)
    assert summary["clients"]["cc"]["included"] is False
    assert summary["clients"]["aa"]["included"] is True
    assert set(summary["final"]["accuracy"]) == {"aa", "bb", "avg"}
    assert summary["rounds"][0]["participants"] == ["aa", "bb"]


@pytest.mark.parametrize("paradigm", ["monolingual", "centralized"])
def test_local_paradigms(paradigm, fed_cfg, tmp_path):
    cfg = fed_cfg.model_copy(update={"paradigm": paradigm})
    summary = run_experiment(cfg, tmp_path / paradigm, show_progress=False)
    assert summary["paradigm"] == paradigm and len(summary["rounds"]) == 2
    assert summary["communication"] == {"bytes_up": 0, "bytes_down": 0,
                                        "measured_from": "serialized Flower messages (protobuf)"}
    if paradigm == "monolingual":
        encoders = [load_arrays(tmp_path / paradigm / f"prompt_encoder.{lang}.safetensors") for lang in ("aa", "bb")]
        assert not np.allclose(encoders[0]["head.weight"], encoders[1]["head.weight"])
    else:
        assert (tmp_path / paradigm / "prompt_encoder.safetensors").is_file()


def test_early_stopping_keeps_the_best_round(fed_cfg, tmp_path):
    # a learning rate too small to change any prediction: round 2 cannot beat round 1
    cfg = fed_cfg.model_copy(update={"fl": fed_cfg.fl.model_copy(update={"rounds": 5, "patience": 1, "lr": 1e-12})})
    summary = run_experiment(cfg, tmp_path / "run", show_progress=False)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final"]["round"] == 1
