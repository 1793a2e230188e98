"""`securefpt audit privacy`: the audit measures leakage, and catches a DP implementation that lies.

The planted bug: nodes whose distributed-DP noise share is zero (patched inside each node's
own process) while their ledgers still report the target epsilon. The audit, from the
released encoder and the aggregates only, must refute that claim; the same run with the
shares in place must stay below it. Without DP, where the model can memorize, the
membership attack must find the canaries (TPR at 1% FPR clearly above 1%).
"""

import json

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from securefpt.engines.privacy_audit import plan_settings, run_privacy_audit
from securefpt.errors import ConfigError
from securefpt.experiment.loading import load_config
from securefpt.node.secagg import secure_aggregation_mod
from securefpt.privacy.auditing import epsilon_refuted, membership, one_run_lower_bound
from tests.attacks import node_app_with
from tests.conftest import make_masakhanews_like, tsv_cfg_overrides

EPSILON = 0.25
CANARIES = 150  # a node
LANGS = ["aa", "bb", "cc"]


def distributed_config(tmp_path, extra=()):
    """DP-FedSGD under SecAgg+ on MiniLM, one round, every record in the round's sample (batch above the
    rows): each included canary's clipped gradient is in the sum exactly once. Three rows a node; 20
    virtual tokens, so that the canaries' gradients are far fewer than the parameters."""
    root = make_masakhanews_like(tmp_path / "data", LANGS, sizes=[3, 3, 3])
    return load_config(None, tsv_cfg_overrides(root, LANGS) + [
        "model.name=builtin:minilm", "model.max_length=32", "peft.num_virtual_tokens=20", "fl.rounds=1",
        "fl.batch_size=256", "secagg.enabled=true", "data.max_eval_per_client=6", *extra])


def silent_shares_app() -> ClientApp:
    """The node's own app with a planted bug: its Skellam noise share is all zeros (the ledger still
    accounts the share it should have added)."""

    def silent(msg: Message, context: Context, call_next) -> Message:
        from securefpt.learning import distributed_dp

        real = distributed_dp.skellam
        distributed_dp.skellam = lambda rng, variance, size: np.zeros(size, dtype=np.int64)
        try:
            return secure_aggregation_mod(msg, context, call_next)
        finally:
            distributed_dp.skellam = real

    return node_app_with(silent)


def noiseless_dp_sgd_app() -> ClientApp:
    """The node's own app with a planted bug in local DP-SGD: Opacus's optimizer clips but adds no noise
    (the ledger still accounts the noise multiplier the plan chose)."""

    def noiseless(msg: Message, context: Context, call_next) -> Message:
        import opacus.optimizers

        real = opacus.optimizers.DPOptimizer

        class Noiseless(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "noise_multiplier": 0.0})

        opacus.optimizers.DPOptimizer = Noiseless
        try:
            return secure_aggregation_mod(msg, context, call_next)
        finally:
            opacus.optimizers.DPOptimizer = real

    return node_app_with(noiseless)


def quiet(_line: str) -> None:
    pass


@pytest.mark.slow
def test_the_audit_refutes_a_distributed_dp_claim_whose_noise_is_missing(tmp_path):
    cfg = distributed_config(tmp_path)
    planted = run_privacy_audit(cfg, tmp_path / "planted", EPSILON, CANARIES, ["distributed-dp"],
                                show_progress=False, client_app=silent_shares_app(), log=quiet)["settings"][0]
    assert planted["epsilon_claimed"] == pytest.approx(EPSILON, abs=0.01)  # the ledgers claim the target
    assert planted["epsilon_lower_bound"] > EPSILON, planted  # the audit refutes it
    assert planted["attacks"]["aggregates"]["epsilon_lower_bound"] > EPSILON  # from the coordinator's view

    honest = run_privacy_audit(cfg, tmp_path / "honest", EPSILON, CANARIES, ["distributed-dp"],
                               show_progress=False, log=quiet)["settings"][0]
    assert honest["epsilon_lower_bound"] < honest["epsilon_claimed"] == pytest.approx(EPSILON, abs=0.01)
    assert honest["mia_auc"] < planted["mia_auc"]


@pytest.mark.slow
def test_the_audit_refutes_a_local_dp_claim_whose_noise_is_missing(tmp_path):
    """The same federation under local DP-SGD (20 steps a node on every record, the nodes' updates summed
    under SecAgg+): with the noise planted away the released model memorizes the canaries. (One step is
    not enough: AdamW's first step is the gradient's sign, which hides the canaries' gradients.)"""
    cfg = distributed_config(tmp_path, ["fl.local_epochs=20", "fl.lr=0.05"])
    planted = run_privacy_audit(cfg, tmp_path / "planted", EPSILON, CANARIES, ["local-dp"], show_progress=False,
                                client_app=noiseless_dp_sgd_app(), log=quiet)["settings"][0]
    assert planted["dp_mode"] == "local" and planted["epsilon_claimed"] == pytest.approx(EPSILON, abs=0.01)
    assert planted["epsilon_lower_bound"] > EPSILON, planted

    honest = run_privacy_audit(cfg, tmp_path / "honest", EPSILON, CANARIES, ["local-dp"], show_progress=False,
                               log=quiet)["settings"][0]
    assert honest["epsilon_lower_bound"] < honest["epsilon_claimed"] == pytest.approx(EPSILON, abs=0.01)
    assert honest["mia_auc"] < planted["mia_auc"]


@pytest.mark.slow
def test_without_dp_the_membership_attack_finds_the_canaries(tmp_path):
    """Scarce and overfit on purpose (full fine-tuning of the tiny model, many epochs): a real leak, so
    DP's chance-level figures mean something. The reference attacks (one shadow run) and the attack on
    each node's personalized model find it too. Also the report, the figures for tools, and the coins."""
    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb"])
    cfg = load_config(None, tsv_cfg_overrides(root, ["aa", "bb"]) + [
        "model.name=builtin:tiny", "model.max_length=32", "peft.method=full", "fl.rounds=1", "fl.local_epochs=10",
        "fl.batch_size=8", "fl.lr=0.001", "secagg.enabled=false", "data.max_eval_per_client=6",
        "personalization.adapt_epochs=2"])
    figures = run_privacy_audit(cfg, tmp_path / "audit", EPSILON, 250, ["no-dp"], show_progress=False, log=quiet,
                                references=1)
    none = figures["settings"][0]
    assert none["epsilon_claimed"] is None and none["tpr_at_fpr_0.01"] >= 0.03 and none["mia_auc"] > 0.6, none
    for attack in ("lira", "rmia"):  # calibrated against a shadow run trained without canaries
        assert none["attacks"][attack]["mia_auc"] > 0.6, (attack, none["attacks"][attack]["mia_auc"])
    personal = none["personalized"]["personalized"]  # each node's own model, adapted on its canaries too
    assert personal["view"] == "personalized model" and personal["mia_auc"] > 0.6 and set(
        personal["per_node_auc"]) == {"aa", "bb"}
    assert "personalized" not in none["attacks"]  # never sent: not held against the claim

    written = json.loads((tmp_path / "audit" / "privacy-audit.json").read_text())
    assert {"dp_mode", "epsilon_claimed", "epsilon_lower_bound", "mia_auc", "tpr_at_fpr_0.01"} <= set(
        written["settings"][0])
    assert (tmp_path / "audit" / "privacy-audit-roc.png").stat().st_size > 0
    assert "no guarantee claimed" in (tmp_path / "audit" / "privacy-audit.md").read_text()
    # the coins stayed with the auditor: a node's file holds only the canaries that are in, and no coin
    coins = json.loads((tmp_path / "audit" / "no-dp" / "canaries.json").read_text())["canaries"]
    held = (tmp_path / "audit" / "no-dp" / "run" / "nodes" / "aa" / "canaries.jsonl").read_text().splitlines()
    assert len(held) == sum(c["in"] for c in coins["aa"]) and all("in" not in json.loads(r) for r in held)
    # a finished setting and its reference run are read back, not trained again
    reference = tmp_path / "audit" / "no-dp-reference-1" / "run" / "summary.json"
    written_at = reference.stat().st_mtime_ns
    again = run_privacy_audit(cfg, tmp_path / "audit", EPSILON, 250, ["no-dp"], show_progress=False, log=quiet,
                              references=1)
    assert reference.stat().st_mtime_ns == written_at and again["settings"][0]["references_cached"]
    assert again["settings"][0]["cached"] and again["settings"][0]["mia_auc"] == none["mia_auc"]


def test_the_one_run_bound_follows_the_binomial_tail():
    # 100 right of 100 guesses refute epsilon up to log(p / (1 - p)) with p^100 = beta
    p = 0.05 ** (1 / 100)
    assert epsilon_refuted(100, 100, 0.05) == pytest.approx(np.log(p / (1 - p)), rel=1e-3)
    assert epsilon_refuted(100, 50, 0.05) == 0.0  # chance refutes nothing
    rng = np.random.default_rng(0)
    coins = rng.integers(0, 2, 1000).astype(bool)
    assert one_run_lower_bound(rng.normal(size=1000), coins).epsilon < 0.5  # scores that know nothing
    perfect = one_run_lower_bound(coins + rng.normal(0, 0.01, 1000), coins)
    assert perfect.correct == perfect.guesses and perfect.epsilon > 3
    m = membership(coins + rng.normal(0, 0.01, 1000), coins)
    assert m.auc == pytest.approx(1.0) and m.tpr_at_fpr[0.01] == pytest.approx(1.0)
    assert membership(rng.normal(size=1000), coins).auc == pytest.approx(0.5, abs=0.06)


@pytest.mark.slow
def test_a_setting_the_nodes_refuse_is_reported_and_the_audit_goes_on(tmp_path):
    """Local DP-SGD at epsilon 0.01 on the public cap of ten rows a node: every node refuses the plan (its
    noise would swamp the update). The audit says so for that setting and audits the next one."""
    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb"])
    cfg = load_config(None, tsv_cfg_overrides(root, ["aa", "bb"]) + [
        "model.name=builtin:tiny", "model.max_length=32", "fl.rounds=1", "secagg.enabled=false",
        "data.max_train_per_client=10", "data.max_eval_per_client=6"])
    figures = run_privacy_audit(cfg, tmp_path / "audit", 0.01, 20, ["local-dp", "no-dp"], show_progress=False,
                                log=quiet)
    assert [s["setting"] for s in figures["settings"]] == ["no-dp"]
    assert "noise-swamps-signal" in figures["skipped"]["local-dp"]
    assert "local-dp: not audited" in (tmp_path / "audit" / "privacy-audit.md").read_text()


def test_the_audit_runs_only_what_it_can_audit(tmp_path):
    cfg = distributed_config(tmp_path)
    settings, skipped = plan_settings(cfg.model_copy(update={"secagg": cfg.secagg.model_copy(
        update={"enabled": False})}), EPSILON)
    assert [s.name for s in settings] == ["no-dp", "local-dp"] and "distributed-dp" in skipped
    assert not settings[0].cfg.dp.enabled and settings[1].cfg.dp.target_epsilon == EPSILON
    with pytest.raises(ConfigError, match="clients"):
        plan_settings(cfg.model_copy(update={"clients": tmp_path}), EPSILON)
