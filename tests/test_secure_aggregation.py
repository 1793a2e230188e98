"""SecAgg+ through Flower's simulation engine: exactness, what the server sees, dropouts, the guard."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from securefpt.aggregation import weighted_average
from securefpt.client_runtime import ClientRuntime
from securefpt.config import load_config
from securefpt.data import label_space
from securefpt.errors import ConfigError
from securefpt.mods import GUARD_REFUSAL_CODE, check_unmask_request, hardened_secaggplus_mod
from securefpt.modeling import build_model, get_trainable
from securefpt.results import load_arrays
from securefpt.secure_aggregation import resolve_settings
from securefpt.simulation import run_federated_simulation
from tests.test_federated import make_masakhanews_like

LANGS = ["aa", "bb", "cc"]


@pytest.fixture
def sec_cfg(tmp_path, tiny_overrides):
    root = make_masakhanews_like(tmp_path / "data", LANGS)  # 10, 14, 18 training rows
    return load_config(None, tiny_overrides + [
        "data.source=masakhanews_tsv", f"data.root={root}", "data.languages=[aa, bb, cc]",
        "data.train_split=test", "data.eval_split=dev", "data.max_train_per_client=null",
        "secagg.enabled=true", "secagg.max_weight=32", "fl.rounds=1", "fl.lr=0.05",
    ])


def client_round_one(cfg):
    """Each client's true round-1 update h_k - h_g and |D_k|, computed in-process."""
    labels = label_space(cfg.data)
    global_arrays = get_trainable(build_model(cfg.model, cfg.peft, len(labels), cfg.seed).model)
    out = {}
    for pid, lang in enumerate(cfg.data.languages):
        rt = ClientRuntime(cfg, lang, labels)
        arrays, result = rt.fit(global_arrays, 1, seed_offset=pid)
        out[lang] = (OrderedDict((k, arrays[k] - global_arrays[k]) for k in arrays), result.num_examples, arrays)
    return global_arrays, out


def max_abs_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_secure_round_equals_plaintext_within_the_quantization_bound(sec_cfg, tmp_path):
    secure = run_federated_simulation(sec_cfg, tmp_path / "secure", show_progress=False)
    plain_cfg = sec_cfg.model_copy(update={"secagg": sec_cfg.secagg.model_copy(update={"enabled": False})})
    plain = run_federated_simulation(plain_cfg, tmp_path / "plain", show_progress=False)
    assert secure["secure_aggregation"]["enabled"] and not plain["secure_aggregation"]["enabled"]
    assert secure["secure_aggregation"]["rounds"][0] == {"round": 1, "participants": LANGS, "dropouts": [],
                                                        "aborted": False}
    diff = max_abs_diff(load_arrays(tmp_path / "secure" / "prompt_encoder.safetensors"),
                        load_arrays(tmp_path / "plain" / "prompt_encoder.safetensors"))
    settings = resolve_settings(sec_cfg, 3)
    bound = settings.error_bound(cohort=3, total_ratio=(10 + 14 + 18) / 32)
    assert bound < 1e-4
    assert diff <= bound + 1e-7  # + float32 rounding of h_g + change
    assert diff > 0  # the secure path really went through the quantizer


def test_the_server_sees_neither_an_update_nor_a_dataset_size(sec_cfg, tmp_path):
    # a longer prompt (1,100+ floats) so that chance correlations of a masked vector stay small
    sec_cfg = sec_cfg.model_copy(update={
        "peft": sec_cfg.peft.model_copy(update={"num_virtual_tokens": 32}),
        "model": sec_cfg.model.model_copy(update={"max_length": 64}),
    })
    received: list[Message] = []
    run_federated_simulation(sec_cfg, tmp_path / "run", show_progress=False, on_receive=received.append)
    _, truth = client_round_one(sec_cfg)
    sizes = {n for _, n, _ in truth.values()}
    assert sizes == {10, 14, 18}

    masked = []
    for msg in received:
        if msg.has_error():
            continue
        content = msg.content
        # no parameters in the clear: every array record of a training reply is empty
        if msg.metadata.message_type == MessageType.TRAIN:
            assert all(len(rec) == 0 for rec in content.array_records.values())
        # no dataset size (nor any other per-client number) in the clear
        for records in (content.config_records, content.metric_records):
            for rec in records.values():
                for value in rec.values():
                    values = value if isinstance(value, list) else [value]
                    assert not any(isinstance(v, int) and not isinstance(v, bool) and v in sizes for v in values)
        configs = content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            masked.append([bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]])
    assert len(masked) == 3
    for vector in masked:
        flat = np.concatenate([a.ravel() for a in vector[1:]]).astype(np.float64)  # [0] is the weight factor
        for delta, _, _ in truth.values():
            true = np.concatenate([d.ravel() for d in delta.values()]).astype(np.float64)
            corr = np.corrcoef(flat, true)[0, 1]
            assert abs(corr) < 5 / np.sqrt(true.size), corr  # 5 sigma of independent noise
    # the statistic does detect a leak: the same update quantized but unmasked is caught
    delta, n, _ = truth["aa"]
    true = np.concatenate([d.ravel() for d in delta.values()])
    unmasked = quantize([true * n / 32], clipping_range=1.0, target_range=2**22)[0].astype(np.float64)
    assert np.corrcoef(unmasked, true)[0, 1] > 0.99


def test_a_client_that_drops_after_key_sharing_leaves_the_survivors_sum(sec_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("SECUREFPT_FAULTS", "cc@collect")
    summary = run_federated_simulation(sec_cfg, tmp_path / "run", show_progress=False)
    rnd = summary["secure_aggregation"]["rounds"][0]
    assert rnd == {"round": 1, "participants": ["aa", "bb"], "dropouts": ["cc"], "aborted": False}
    global_arrays, truth = client_round_one(sec_cfg)
    expected = weighted_average([(truth["aa"][2], 10), (truth["bb"][2], 14)])
    got = load_arrays(tmp_path / "run" / "prompt_encoder.safetensors")
    bound = resolve_settings(sec_cfg, 3).error_bound(cohort=2, total_ratio=(10 + 14) / 32)
    assert max_abs_diff(expected, got) <= bound + 1e-7
    assert max_abs_diff(got, global_arrays) > 1e-3  # the model did move


def test_too_many_dropouts_abort_the_round_and_leave_the_model_unchanged(sec_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("SECUREFPT_FAULTS", "bb@collect,cc@collect")
    cfg = sec_cfg.model_copy(update={"fl": sec_cfg.fl.model_copy(update={"rounds": 2})})
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    secure = summary["secure_aggregation"]
    assert secure["aborted_rounds"] == [1, 2]
    assert all(r["participants"] == [] for r in secure["rounds"])
    global_arrays, _ = client_round_one(cfg)
    got = load_arrays(tmp_path / "run" / "prompt_encoder.safetensors")
    assert max_abs_diff(got, global_arrays) == 0.0
    assert [r["aborted"] for r in summary["rounds"]] == [True, True]


def _unmask_message(active, dead):
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
        Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})})
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    return msg


@pytest.mark.parametrize("active,dead,why", [
    ([1, 2, 3], [3], "both surviving and dropped"),
    ([1], [2, 3], "minimum cohort"),
    ([1, 1], [], "twice"),
])
def test_the_guard_refuses_a_forged_unmask_request(active, dead, why, flower_task):
    calls = []
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = hardened_secaggplus_mod(_unmask_message(active, dead), context, lambda m, c: calls.append(m))
    assert reply.has_error() and reply.error.code == GUARD_REFUSAL_CODE
    assert why in reply.error.reason
    assert calls == []  # nothing reached SecAgg+ or the handler
    assert why in str(context.state.config_records["securefpt-guard"]["refusals"][0])


def test_the_guard_accepts_an_honest_request():
    assert check_unmask_request([1, 2, 3], [4], min_cohort=2) is None
    assert check_unmask_request([1, 2], [], min_cohort=3) is not None


@pytest.mark.parametrize("override,field", [
    ("secagg.num_shares=4", "secagg.num_shares"),
    ("secagg.reconstruction_threshold=5", "secagg.reconstruction_threshold"),
    ("secagg.clipping_range=0", "secagg.clipping_range"),
    ("secagg.max_weight=4", "secagg.max_weight"),
    ("secagg.modulus_range=8388608", "secagg.modulus_range"),
    ("secagg.min_cohort=9", "secagg.min_cohort"),
    ("fl.fraction_fit=0.2", "at least 2 clients"),
])
def test_invalid_settings_fail_before_any_training(sec_cfg, tmp_path, override, field):
    cfg = load_config(None, [f"data.root={sec_cfg.data.root}", "data.source=masakhanews_tsv",
                             "data.languages=[aa, bb, cc, dd, ee]", "data.max_train_per_client=8", override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_federated_simulation(cfg, tmp_path / "never", show_progress=False)
    assert not (tmp_path / "never").exists()
