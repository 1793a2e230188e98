"""DP-SGD with Opacus: accounting across rounds, real clipping, budgets, PEFT methods."""

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from securefpt.config import load_config
from securefpt.data import label_space, load_client_data
from securefpt.errors import ConfigError
from securefpt.modeling import build_model, get_trainable, set_trainable
from securefpt.privacy import PrivacyLedger, dp_train, epsilon_of, plan_privacy
from securefpt.simulation import run_federated_simulation
from securefpt.training import train_local
from tests.test_federated import make_masakhanews_like


def test_opacus_reference_values_from_its_test_suite():
    # sigma=1.5, q=0.04, 2250 steps, delta=1e-5: RDP 7.329, PRV 6.777 (DESIGN, Opacus tests)
    history = [(1.5, 0.04, 2250)]
    assert epsilon_of(history, 1e-5, "rdp") == pytest.approx(7.329, abs=0.01)
    assert epsilon_of(history, 1e-5, "prv") == pytest.approx(6.777, abs=0.05)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_persists_three_rounds_as_one_accounting_of_3k_steps(accountant):
    records: dict = {}
    cfg = load_config(None, ["dp.enabled=true", f"dp.accountant={accountant}", "fl.batch_size=8", "fl.rounds=3"])
    plan = plan_privacy(cfg, num_examples=40)
    for _ in range(3):  # each round: load the state, spend, save it back (as the ClientApp does)
        ledger = PrivacyLedger.load(records, cfg.dp.delta, accountant)
        ledger.spend(plan, plan.steps_per_round)
        ledger.save(records)
    ledger = PrivacyLedger.load(records, cfg.dp.delta, accountant)
    k = plan.steps_per_round
    assert ledger.steps == 3 * k
    fresh = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    fresh.history = [(plan.noise_multiplier, plan.sample_rate, 3 * k)]
    assert ledger.epsilon() == pytest.approx(fresh.get_epsilon(delta=cfg.dp.delta), rel=1e-3)
    # the noise was derived so that the whole planned run spends the target
    assert ledger.epsilon() == pytest.approx(cfg.dp.target_epsilon, rel=0.02)


def _tiny(method="prompt_tuning", extra=()):
    return load_config(None, ["model.name=builtin:tiny", "model.max_length=32", "peft.num_virtual_tokens=4",
                              f"peft.method={method}", "dp.enabled=true", *extra])


def _examples(cfg, n):
    labels = label_space(cfg.data)
    return labels, load_client_data(cfg.data, "yor", labels, 0).train[:n]


def test_clipping_is_real_with_zero_noise():
    """One full-batch step (q = 1) of SGD: the update is -lr * mean of clipped per-sample grads."""
    n, clip, lr = 6, 0.05, 1.0
    cfg = _tiny(extra=["dp.noise_multiplier=0", f"dp.max_grad_norm={clip}", f"fl.batch_size={n}", f"fl.lr={lr}",
                       "fl.local_epochs=1", "dp.target_epsilon=null"])
    labels, examples = _examples(cfg, n)
    a = build_model(cfg.model, cfg.peft, len(labels), 0)
    start = get_trainable(a.model)

    # reference by hand: per-sample gradients, each clipped to `clip`, averaged over n
    ref = build_model(cfg.model, cfg.peft, len(labels), 0)
    params = [p for p in ref.model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for ex in examples:
        enc = ref.tokenizer([ex.text], truncation=True, max_length=ref.max_text_tokens, return_tensors="pt")
        loss = nn.functional.cross_entropy(ref.model(enc["input_ids"], enc["attention_mask"]), torch.tensor([ex.label]))
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads)]
    assert max(norms) > clip  # clipping is active for this test to mean anything
    mean_clipped = [t / n for t in total]

    plan = plan_privacy(cfg, n)
    assert plan.sample_rate == 1.0 and plan.steps_per_round == 1
    import securefpt.privacy as privacy

    sgd = lambda model, fl: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=fl.lr)  # noqa
    original = privacy.make_optimizer
    privacy.make_optimizer = sgd
    try:
        dp_train(a, examples, cfg, plan, seed=0)
    finally:
        privacy.make_optimizer = original
    after = get_trainable(a.model)
    names = [n_ for n_, p in ref.model.named_parameters() if p.requires_grad]
    for name, g in zip(names, mean_clipped):
        np.testing.assert_allclose(after[name] - start[name], -lr * g.numpy(), atol=1e-6, err_msg=name)


def test_zero_noise_and_huge_clip_equals_non_dp_training():
    n = 8
    cfg = _tiny(extra=["dp.noise_multiplier=0", "dp.max_grad_norm=1e9", f"fl.batch_size={n}", "dp.target_epsilon=null"])
    labels, examples = _examples(cfg, n)
    a = build_model(cfg.model, cfg.peft, len(labels), 0)
    b = build_model(cfg.model, cfg.peft, len(labels), 0)
    dp_train(a, examples, cfg, plan_privacy(cfg, n), seed=0)
    train_local(b, examples, cfg.fl, seed=0)
    got, want = get_trainable(a.model), get_trainable(b.model)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "lora"])
def test_dp_training_works_for_each_peft_method(method):
    cfg = _tiny(method, ["fl.batch_size=4"])
    labels, examples = _examples(cfg, 16)
    a = build_model(cfg.model, cfg.peft, len(labels), 0)
    before = get_trainable(a.model)
    plan = plan_privacy(cfg, len(examples))
    result = dp_train(a, examples, cfg, plan, seed=0)
    after = get_trainable(a.model)
    assert result.steps == plan.steps_per_round == 4
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before)
    assert np.isfinite(result.loss)
    # the hooks are gone: the model trains normally afterwards
    set_trainable(a.model, before)
    train_local(a, examples, cfg.fl, seed=0)


def test_full_fine_tuning_with_dp_is_a_clear_error():
    with pytest.raises(ConfigError, match="peft.method=full"):
        load_config(None, ["dp.enabled=true", "peft.method=full"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "lora"])
def test_dp_training_on_the_packaged_minilm(method):
    cfg = load_config(None, ["model.name=builtin:minilm", "model.max_length=48", f"peft.method={method}",
                             "dp.enabled=true", "fl.batch_size=8"])
    labels, examples = _examples(cfg, 16)
    a = build_model(cfg.model, cfg.peft, len(labels), 0)
    before = get_trainable(a.model)
    dp_train(a, examples, cfg, plan_privacy(cfg, 16), seed=0)
    after = get_trainable(a.model)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before)


@pytest.fixture
def dp_fed_cfg(tmp_path, tiny_overrides):
    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb", "cc"])  # 10, 14, 18 rows
    return lambda *extra: load_config(None, tiny_overrides + [
        "data.source=masakhanews_tsv", f"data.root={root}", "data.languages=[aa, bb, cc]",
        "data.train_split=test", "data.eval_split=dev", "data.max_train_per_client=null",
        "dp.enabled=true", "fl.batch_size=4", *extra])


def test_reported_epsilon_equals_opacus_recomputed_from_the_report(dp_fed_cfg, tmp_path):
    cfg = dp_fed_cfg("fl.rounds=3", "dp.target_epsilon=4", "dp.accountant=rdp")
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    p = summary["privacy"]
    assert p["accountant"] == "rdp" and p["delta"] == 1e-5
    for lang in ("aa", "bb", "cc"):
        fresh = RDPAccountant()
        fresh.history = [(p["noise_multiplier"][lang], p["sample_rate"][lang], p["steps"][lang])]
        assert p["epsilon"][lang] == pytest.approx(fresh.get_epsilon(delta=p["delta"]), rel=1e-6)
        assert p["epsilon"][lang] == pytest.approx(4.0, rel=0.02)  # the budget covers the whole run
        # and the per-round figures are cumulative
        per_round = [r["epsilon"][lang] for r in summary["rounds"]]
        assert per_round == sorted(per_round) and per_round[-1] == p["epsilon"][lang]
    # steps accumulate across rounds: 3 rounds x 1/q Poisson batches
    assert p["steps"]["cc"] == 3 * int(1 / p["sample_rate"]["cc"])


@pytest.mark.parametrize("secagg", ["false", "true"])
def test_a_client_over_budget_declines_and_the_run_goes_on(dp_fed_cfg, tmp_path, secagg):
    # fixed noise; batch 4: aa (10 rows, q=0.4) takes 2 steps a round, cc (18 rows) 4.
    sigma = 1.5
    eps_aa_2_rounds = epsilon_of([(sigma, 0.4, 4)], 1e-5, "prv")
    eps_cc_2_rounds = epsilon_of([(sigma, 4 / 18, 8)], 1e-5, "prv")
    budget = (eps_aa_2_rounds + eps_cc_2_rounds) / 2  # aa affords one round, cc two
    assert eps_cc_2_rounds < budget < eps_aa_2_rounds / 1.01
    cfg = dp_fed_cfg("fl.rounds=2", f"dp.noise_multiplier={sigma}", f"dp.target_epsilon={budget}",
                     f"secagg.enabled={secagg}")
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    r1, r2 = summary["rounds"]
    assert not r2["aborted"]  # with SecAgg+ the share graph shrinks to the two remaining clients
    assert r1["participants"] == ["aa", "bb", "cc"] and r1["declined"] == {}
    assert "privacy budget" in r2["declined"]["aa"]
    assert "aa" not in r2["participants"] and "cc" in r2["participants"]
    assert summary["privacy"]["steps"]["aa"] == 2 and summary["privacy"]["steps"]["cc"] == 8
    assert summary["privacy"]["epsilon"]["aa"] <= budget
