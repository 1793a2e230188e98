"""SecAgg+ through Flower's simulation engine: exactness, what the coordinator sees, dropouts, settings."""

import numpy as np
import pytest
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from securefpt.engines.simulation import run_federated_simulation
from securefpt.errors import ConfigError
from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.artifacts import load_arrays
from securefpt.learning.modeling import build_model, get_trainable, set_trainable
from securefpt.learning.training import train_local
from tests.conftest import make_masakhanews_like, quantization_bound, tsv_cfg_overrides

LANGS = ["aa", "bb", "cc"]


def secure_cfg(tmp_path, tiny_overrides, langs=LANGS, *extra):
    root = make_masakhanews_like(tmp_path / "data", langs)  # 10, 14, 18, 22 training rows
    return load_config(None, tiny_overrides + tsv_cfg_overrides(root, langs) + [
        "secagg.enabled=true", "secagg.max_weight=32", "fl.rounds=1", "fl.lr=0.05", *extra])


def bound_of(cfg, cohort, sizes):
    return quantization_bound(cfg, cohort, sum(sizes) / cfg.secagg.max_weight)


def round_one_by_hand(cfg):
    """Each node's true round-1 encoder h_k and |D_k|, from the learning primitives alone."""
    labels = label_space(cfg.data)
    h_g = get_trainable(build_model(cfg.model, cfg.peft, len(labels), cfg.seed).model)
    out = {}
    for lang in cfg.data.languages:
        model = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
        set_trainable(model.model, h_g)
        data = load_client_data(cfg.data, lang, labels, cfg.seed)
        train_local(model, data.train, cfg.training_plan(), cfg.seed * 100_003 + 1)
        out[lang] = (get_trainable(model.model), len(data.train))
    return h_g, out


def average(updates):
    total = sum(n for _, n in updates)
    return {k: sum(n / total * u[k].astype(np.float64) for u, n in updates) for k in updates[0][0]}


def max_abs_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_secure_round_equals_plaintext_within_the_quantization_bound(tmp_path, tiny_overrides):
    cfg = secure_cfg(tmp_path, tiny_overrides)
    secure = run_federated_simulation(cfg, tmp_path / "secure", show_progress=False)
    plain_cfg = cfg.model_copy(update={"secagg": cfg.secagg.model_copy(update={"enabled": False})})
    plain = run_federated_simulation(plain_cfg, tmp_path / "plain", show_progress=False)
    assert secure["secure_aggregation"]["enabled"] and not plain["secure_aggregation"]["enabled"]
    assert secure["secure_aggregation"]["rounds"][0] == {"round": 1, "participants": LANGS, "dropouts": [],
                                                        "aborted": False}
    diff = max_abs_diff(load_arrays(tmp_path / "secure" / "prompt_encoder.safetensors"),
                        load_arrays(tmp_path / "plain" / "prompt_encoder.safetensors"))
    bound = bound_of(cfg, 3, [10, 14, 18])
    assert bound < 1e-4
    assert diff <= bound + 1e-7  # + float32 rounding of h_g + change
    assert diff > 0  # the secure path really went through the quantizer
    # a secure round is six exchanges with the nodes (SecAgg+'s setup, share-keys, collect and unmask
    # stages, the survivor-set consistency check, and the evaluation that offers the next round);
    # a plaintext round two (train, evaluate). Each is timed from push to last reply.
    assert [r["exchanges"] for r in secure["rounds"]] == [6] * cfg.fl.rounds
    assert [r["exchanges"] for r in plain["rounds"]] == [2] * cfg.fl.rounds
    assert all(len(r["exchange_seconds"]) == r["exchanges"] and min(r["exchange_seconds"]) >= 0
               for r in secure["rounds"] + plain["rounds"])


def test_the_coordinator_sees_neither_an_update_nor_a_dataset_size(tmp_path, tiny_overrides):
    # a longer prompt (1,100+ floats) so that chance correlations of a masked vector stay small;
    # every node a different number of training and evaluation rows, so a size would stand out
    cfg = secure_cfg(tmp_path, tiny_overrides, LANGS, "peft.num_virtual_tokens=32", "model.max_length=64")
    received: list[Message] = []
    run_federated_simulation(cfg, tmp_path / "run", show_progress=False, on_receive=received.append)
    h_g, truth = round_one_by_hand(cfg)
    sizes = {n for _, n in truth.values()}
    assert sizes == {10, 14, 18}
    # |D_k|, its weight ratio, and each node's evaluation rows (6, 7, 8)
    forbidden = sizes | {n / 32 for n in sizes} | {6, 7, 8}

    masked = []
    for msg in received:
        if msg.has_error() or msg.metadata.message_type != MessageType.TRAIN:
            continue  # evaluation replies carry what the nodes' rules release (tests/test_hostile_coordinator.py)
        content = msg.content
        assert all(len(rec) == 0 for rec in content.array_records.values())  # no parameters in the clear
        for records in (content.config_records, content.metric_records):
            for rec in records.values():
                for value in rec.values():
                    for v in value if isinstance(value, list) else [value]:
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0:
                            assert v not in forbidden, v
        configs = content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            masked.append([bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]])
    assert len(masked) == 3
    for vector in masked:
        flat = np.concatenate([a.ravel() for a in vector[1:]]).astype(np.float64)  # [0] is the weight factor
        for arrays, _ in truth.values():
            true = np.concatenate([(arrays[k] - h_g[k]).ravel() for k in h_g]).astype(np.float64)
            corr = np.corrcoef(flat, true)[0, 1]
            assert abs(corr) < 5 / np.sqrt(true.size), corr  # 5 sigma of independent noise
    # the statistic does detect a leak: the same update quantized but unmasked is caught
    arrays, n = truth["aa"]
    true = np.concatenate([(arrays[k] - h_g[k]).ravel() for k in h_g])
    unmasked = quantize([true * n / 32], clipping_range=1.0, target_range=2**22)[0].astype(np.float64)
    assert np.corrcoef(unmasked, true)[0, 1] > 0.99


@pytest.mark.parametrize("fault, dropped", [("cc@collect", "cc"), ("dd@share_keys", "dd")],
                         ids=["after-key-sharing", "during-key-sharing"])
def test_a_node_that_drops_out_costs_only_its_own_contribution(tmp_path, tiny_overrides, monkeypatch, fault,
                                                              dropped):
    """4 nodes, threshold 3: one dropout is survivable, and the round sums exactly the others. A node
    that fails after key sharing (at collect) is unmasked as dead; one that fails during it sent no
    key shares, so nobody masked with it: Flower alone counted it dead at unmask and asked the
    survivors for shares of its key they never had, aborting everyone's round."""
    langs = ["aa", "bb", "cc", "dd"]
    sizes = dict(zip(langs, (10, 14, 18, 22)))
    survivors = [lang for lang in langs if lang != dropped]
    cfg = secure_cfg(tmp_path, tiny_overrides, langs)
    monkeypatch.setenv("SECUREFPT_FAULTS", fault)
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    assert summary["secure_aggregation"]["settings"]["reconstruction_threshold"] == 3
    rnd = summary["secure_aggregation"]["rounds"][0]
    assert rnd == {"round": 1, "participants": survivors, "dropouts": [dropped], "aborted": False}
    h_g, truth = round_one_by_hand(cfg)
    expected = average([truth[lang] for lang in survivors])
    got = load_arrays(tmp_path / "run" / "prompt_encoder.safetensors")
    assert max_abs_diff(expected, got) <= bound_of(cfg, 3, [sizes[lang] for lang in survivors]) + 1e-7
    assert max_abs_diff(got, h_g) > 1e-3  # the model did move


def test_too_many_dropouts_abort_the_round_and_leave_the_model_unchanged(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("SECUREFPT_FAULTS", "bb@collect,cc@collect")
    cfg = secure_cfg(tmp_path, tiny_overrides, LANGS, "fl.rounds=2")
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    secure = summary["secure_aggregation"]
    assert secure["aborted_rounds"] == [1, 2]
    assert all(r["participants"] == [] for r in secure["rounds"])
    h_g, _ = round_one_by_hand(cfg)
    assert max_abs_diff(load_arrays(tmp_path / "run" / "prompt_encoder.safetensors"), h_g) == 0.0
    assert [r["aborted"] for r in summary["rounds"]] == [True, True]
    # aa contributed on the initial encoder in round 1: it does not contribute on it again
    assert summary["rounds"][1]["declined"]["aa"].startswith("encoder-reused")


@pytest.mark.parametrize("override,field", [
    ("secagg.num_shares=4", "secagg.num_shares"),  # a field's own bound: refused as the file is read
    ("secagg.num_shares=7", "secagg.num_shares"),  # more share holders than the 5 nodes: refused per cohort
    ("secagg.reconstruction_threshold=3", "secagg.reconstruction_threshold"),  # 3 of 5 is not above 2/3
    ("secagg.clipping_range=0", "secagg.clipping_range"),
    ("secagg.max_weight=4", "secagg.max_weight"),
    ("secagg.modulus_range=8388608", "secagg.modulus_range"),
    ("secagg.min_cohort=9", "secagg.min_cohort"),
    ("fl.fraction_fit=0.2", "at least 2 clients"),
])
def test_invalid_settings_fail_before_any_training(tmp_path, override, field):
    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb", "cc", "dd", "ee"])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg = load_config(None, [f"data.root={root}", "data.source=masakhanews_tsv", "data.train_split=test",
                                 "data.eval_split=dev", "data.languages=[aa, bb, cc, dd, ee]",
                                 "data.max_train_per_client=8", "model.name=builtin:tiny", override])
        run_federated_simulation(cfg, tmp_path / "never", show_progress=False)
    assert not (tmp_path / "never").exists()


def test_an_update_the_quantizer_would_clip_is_scaled_into_range_not_refused_and_not_corrupted(tmp_path,
                                                                                               tiny_overrides):
    """clipping_range 1e-5: every weighted update is larger. A refusal would tell the coordinator, per
    its chosen range, whether |D_k| x the update exceeds it (a size oracle), so each node scales its
    weighted change into the range instead (direction kept) and the round completes: the new encoder
    is the weighted average of the scaled changes, within the quantization bound (no coordinate was
    clipped by Flower's quantizer)."""
    cfg = secure_cfg(tmp_path, tiny_overrides, LANGS, "secagg.clipping_range=0.00001")
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    [r1] = summary["rounds"]
    assert not r1["aborted"] and sorted(r1["participants"]) == LANGS and not r1.get("failures")
    h_g, truth = round_one_by_hand(cfg)
    clip, max_weight = cfg.secagg.clipping_range, cfg.secagg.max_weight
    scaled, ratios = [], []
    for h_k, n in truth.values():
        r = min(n, max_weight) / max_weight
        peak = max(float(np.abs(h_k[k] - h_g[k]).max()) for k in h_g)
        s = min(1.0, 0.999 * clip / (r * peak))
        scaled.append({k: r * s * (h_k[k].astype(np.float64) - h_g[k]) for k in h_g})
        ratios.append(r)
    expected = {k: h_g[k] + sum(u[k] for u in scaled) / sum(ratios) for k in h_g}
    got = load_arrays(tmp_path / "run" / "prompt_encoder.safetensors")
    assert max_abs_diff(got, h_g) > 0  # the round moved the encoder
    assert max_abs_diff(got, expected) <= quantization_bound(cfg, 3, sum(ratios)) + 1e-7
