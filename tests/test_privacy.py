"""DP-SGD with Opacus: real clipping, real noise of the right size, accounting across rounds and experiments."""

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

import securefpt.learning.dp_training as dp_training
from securefpt.engines.simulation import run_federated_simulation
from securefpt.errors import ConfigError
from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.dp_training import DPSchedule, dp_train
from securefpt.learning.modeling import build_model, get_trainable, set_trainable
from securefpt.learning.training import local_steps, train_local
from securefpt.node.budget import Ledger, epsilon_of, plan_privacy
from securefpt.node.config import Budget
from securefpt.protocol.refusals import NodeRefusal
from tests.conftest import make_masakhanews_like, tsv_cfg_overrides


def _request(*extra, labels=("a", "b")):
    return load_config(None, ["dp.enabled=true", *extra]).request(list(labels))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_ledger_that_outlives_three_rounds_is_one_accounting_of_3k_steps(tmp_path, accountant):
    request = _request(f"dp.accountant={accountant}", "fl.batch_size=8", "fl.rounds=3")
    plan = plan_privacy(request, num_examples=40)
    for _ in range(3):  # each round a fresh process reads the ledger file, spends and writes it back
        Ledger(tmp_path, "news", Budget()).spend(request.sha256(), plan, plan.steps_per_round)
    ledger = Ledger(tmp_path, "news", Budget())
    k = plan.steps_per_round
    assert ledger.steps(request.sha256()) == 3 * k
    fresh = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    fresh.history = [(plan.noise_multiplier, plan.sample_rate, 3 * k)]
    assert ledger.epsilon(request.sha256(), plan) == pytest.approx(fresh.get_epsilon(delta=1e-5), rel=1e-3)
    # the noise was derived so that the whole planned run spends the target
    assert ledger.epsilon(request.sha256(), plan) == pytest.approx(request.dp.target_epsilon, rel=0.02)
    # a fourth round exceeds the experiment's target: refused where budget is spent
    with pytest.raises(NodeRefusal) as refusal:
        ledger.authorize(request.sha256(), plan)
    assert refusal.value.code == "budget-exhausted"


def test_the_lifetime_budget_spans_experiments_on_the_same_dataset(tmp_path):
    first, renamed = _request("fl.rounds=2", "name=a"), _request("fl.rounds=2", "name=b")
    plan = plan_privacy(first, num_examples=64)
    run = [plan.round_spend()] * 2
    one, two = epsilon_of(run, 1e-5, "prv"), epsilon_of(run * 2, 1e-5, "prv")
    budget = Budget(epsilon=(one + two) / 2)  # one experiment fits, two composed do not
    ledger = Ledger(tmp_path, "news", budget)
    ledger.check_plan(first.sha256(), plan)  # the first experiment fits the lifetime budget
    for _ in range(2):
        ledger.authorize(first.sha256(), plan)
        ledger.spend(first.sha256(), plan, plan.steps_per_round)
    # the same experiment renamed has a fresh target of its own, but the dataset's lifetime does not
    assert ledger.epsilon(renamed.sha256(), plan) == 0.0
    with pytest.raises(NodeRefusal, match="lifetime"):
        ledger.check_plan(renamed.sha256(), plan)
    assert Ledger(tmp_path, "other-dataset", budget).allows_round(renamed.sha256(), plan)


def test_a_federation_draining_the_budget_with_throwaway_experiments_spends_only_its_own_share(tmp_path):
    """Channel 9 (drain): a coordinator starts experiment after experiment, each within its own target,
    until the dataset's lifetime budget is gone for every federation the node serves. With
    `budget.per_federation` its experiments stop at its share; another federation (another pinned
    coordinator key) still trains; without a share the drain takes everything."""
    plan = plan_privacy(_request("fl.rounds=2"), num_examples=64)
    runs = lambda k: epsilon_of([plan.round_spend()] * 2 * k, 1e-5, "prv")  # noqa: E731  (k experiments composed)
    budget = Budget(epsilon=runs(5), per_federation=runs(2))  # a share of two experiments in a lifetime of five

    def drain(ledger, name_prefix):
        """Throwaway experiments until the node refuses one at setup; how many it trained."""
        for i in range(10):
            request = _request("fl.rounds=2", f"name={name_prefix}{i}")
            try:
                ledger.check_plan(request.sha256(), plan)
            except NodeRefusal as refusal:
                assert refusal.code == "budget-exhausted"
                return i, str(refusal.detail)
            for _ in range(2):
                ledger.authorize(request.sha256(), plan)
                ledger.spend(request.sha256(), plan, plan.steps_per_round)
        return 10, ""

    done, why = drain(Ledger(tmp_path / "shared", "news", budget, federation="hostile"), "throwaway-")
    assert done == 2 and "this federation's share" in why  # two experiments fit its share, the third does not
    other = Ledger(tmp_path / "shared", "news", budget, federation="honest")
    assert other.federation_epsilon() == 0.0 and other.lifetime_epsilon() == pytest.approx(runs(2), rel=1e-6)
    assert drain(other, "real-")[0] == 2  # the other federation still trains its own share
    done, why = drain(Ledger(tmp_path / "alone", "news", Budget(epsilon=runs(5)), federation="hostile"), "throwaway-")
    assert done == 5 and "lifetime" in why  # the control: without a share one coordinator drains it all


def _tiny(method="prompt_tuning", extra=()):
    return load_config(None, ["model.name=builtin:tiny", "model.max_length=32", "peft.num_virtual_tokens=4",
                              f"peft.method={method}", "dp.enabled=true", *extra])


def _examples(cfg, n):
    labels = label_space(cfg.data)
    return labels, load_client_data(cfg.data, "yor", labels, 0).train[:n]


@pytest.fixture
def sgd(monkeypatch):
    """Plain SGD in place of AdamW: the update is then -lr times the privatized gradient."""
    monkeypatch.setattr(dp_training, "make_optimizer",
                        lambda model, fl: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=fl.lr))


def test_clipping_is_real_with_zero_noise(sgd):
    """One full-batch step (q = 1) of SGD: the update is -lr * mean of clipped per-sample grads."""
    n, clip, lr = 6, 0.05, 1.0
    cfg = _tiny(extra=[f"fl.batch_size={n}", f"fl.lr={lr}"])
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

    schedule = DPSchedule(noise_multiplier=0.0, sample_rate=1.0, steps=1, max_grad_norm=clip)
    dp_train(a, examples, cfg.training_plan(), schedule)
    after = get_trainable(a.model)
    names = [n_ for n_, p in ref.model.named_parameters() if p.requires_grad]
    for name, g in zip(names, mean_clipped):
        np.testing.assert_allclose(after[name] - start[name], -lr * g.numpy(), atol=1e-6, err_msg=name)


def test_the_noise_has_standard_deviation_sigma_c_over_b_and_is_fresh_every_run(sgd):
    """One full-batch SGD step (q = 1, so the batch is every example and the clipped mean is the
    same in every run): update - noiseless update = -lr * N(0, (sigma * C)^2) / B per coordinate.

    The bound is Fisher's: the sample standard deviation of N independent normals has
    relative standard error 1/sqrt(2N); with N > 1,000 coordinates 15% is more than six of
    them, so the test fails when the noise is missing, halved or doubled, not by chance.
    """
    n, clip, sigma, lr = 8, 0.5, 1.3, 1.0
    cfg = _tiny(extra=[f"fl.batch_size={n}", f"fl.lr={lr}", "peft.num_virtual_tokens=32", "model.max_length=64"])
    labels, examples = _examples(cfg, n)
    runs = {}
    for name, noise in (("clean", 0.0), ("noisy", sigma), ("again", sigma)):
        model = build_model(cfg.model, cfg.peft, len(labels), 0)
        start = get_trainable(model.model)
        dp_train(model, examples, cfg.training_plan(), DPSchedule(noise, 1.0, 1, clip))
        runs[name] = np.concatenate([(get_trainable(model.model)[k] - start[k]).ravel() for k in start])
    noise = (runs["clean"] - runs["noisy"]).astype(np.float64) / lr
    expected = sigma * clip / n
    assert noise.size > 1000
    assert np.std(noise) == pytest.approx(expected, rel=0.15)
    assert abs(np.mean(noise)) < 5 * expected / np.sqrt(noise.size)
    # OS entropy every run: the same round on the same data gets different noise
    assert np.corrcoef(runs["noisy"] - runs["clean"], runs["again"] - runs["clean"])[0, 1] < 0.2


def test_zero_noise_and_huge_clip_equals_non_dp_training():
    n = 8
    cfg = _tiny(extra=[f"fl.batch_size={n}"])
    labels, examples = _examples(cfg, n)
    a = build_model(cfg.model, cfg.peft, len(labels), 0)
    b = build_model(cfg.model, cfg.peft, len(labels), 0)
    dp_train(a, examples, cfg.training_plan(), DPSchedule(0.0, 1.0, 1, 1e9))
    train_local(b, examples, cfg.training_plan(), seed=0)
    got, want = get_trainable(a.model), get_trainable(b.model)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "lora"])
def test_dp_training_works_for_each_peft_method(method):
    cfg = _tiny(method, ["fl.batch_size=4"])
    labels, examples = _examples(cfg, 16)
    a = build_model(cfg.model, cfg.peft, len(labels), 0)
    before = get_trainable(a.model)
    plan = plan_privacy(cfg.request(labels), len(examples))
    assert plan.steps_per_round == 4 and plan.noise_multiplier > 0.3
    result = dp_train(a, examples, cfg.training_plan(), DPSchedule(plan.noise_multiplier, plan.sample_rate, 4, 1.0))
    after = get_trainable(a.model)
    assert result.steps == 4 and np.isfinite(result.loss)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before)  # every trainable tensor moved
    # the hooks are gone: the model trains normally afterwards, and deterministically again
    set_trainable(a.model, before)
    train_local(a, examples, cfg.training_plan(), seed=0)
    b = build_model(cfg.model, cfg.peft, len(labels), 0)
    train_local(b, examples, cfg.training_plan(), seed=0)
    for k, v in get_trainable(b.model).items():
        np.testing.assert_allclose(get_trainable(a.model)[k], v, atol=1e-6, err_msg=k)


def test_a_node_logs_how_far_a_long_training_step_is_on_its_own_log(monkeypatch):
    """node/progress.py: a line per step here (EVERY_S 0), counting up to the planned steps, which are
    the steps taken (DP-SGD's schedule; local epochs' batches, the last one short)."""
    import logging

    import securefpt.node.progress as progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    progress.LOG.addHandler(handler)
    old_level = progress.LOG.level
    progress.LOG.setLevel(logging.INFO)
    try:
        cfg = _tiny("prompt_tuning", ["fl.batch_size=4", "fl.local_epochs=2"])
        labels, examples = _examples(cfg, 14)
        a = build_model(cfg.model, cfg.peft, len(labels), 0)
        plan = plan_privacy(cfg.request(labels), len(examples))
        step = progress.StepProgress("aa-node", "DP-SGD training", plan.steps_per_round)
        dp = dp_train(a, examples, cfg.training_plan(), DPSchedule(plan.noise_multiplier, plan.sample_rate,
                                                     plan.steps_per_round, 1.0), on_step=step)
        step.close()
        planned = local_steps(len(examples), cfg.training_plan())
        step = progress.StepProgress("aa-node", "training", planned)
        plain = train_local(a, examples, cfg.training_plan(), seed=0, on_step=step)
        step.close()
    finally:
        progress.LOG.removeHandler(handler)
        progress.LOG.setLevel(old_level)
    assert dp.steps == plan.steps_per_round and plain.steps == planned == 8  # 2 epochs of 4 batches (4+4+4+2)
    assert lines[dp.steps - 1].startswith(f"aa-node: DP-SGD training: step {dp.steps} of {dp.steps} (")
    assert lines[dp.steps + 1 + planned - 1].startswith(f"aa-node: training: step {planned} of {planned} (")
    assert lines[-1].startswith(f"aa-node: training: {planned} steps done in ")


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
    plan = plan_privacy(cfg.request(labels), 16)
    schedule = DPSchedule(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, 1.0)
    dp_train(a, examples, cfg.training_plan(), schedule)
    after = get_trainable(a.model)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before)


@pytest.fixture
def dp_fed_cfg(tmp_path, tiny_overrides):
    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb", "cc"])  # 10, 14, 18 rows
    return lambda *extra: load_config(None, tiny_overrides + tsv_cfg_overrides(root, ["aa", "bb", "cc"]) + [
        "dp.enabled=true", "fl.batch_size=4", *extra])


def test_reported_epsilon_equals_opacus_recomputed_from_the_report(dp_fed_cfg, tmp_path):
    cfg = dp_fed_cfg("fl.rounds=3", "dp.target_epsilon=4", "dp.accountant=rdp", "secagg.enabled=false")
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
def test_a_node_over_budget_declines_and_the_run_goes_on(dp_fed_cfg, tmp_path, secagg):
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
    assert not r2["aborted"]  # with SecAgg+ the share graph shrinks to the two remaining nodes
    assert r1["participants"] == ["aa", "bb", "cc"] and r1["declined"] == {}
    assert r2["declined"]["aa"].startswith("budget-exhausted")
    assert "aa" not in r2["participants"] and "cc" in r2["participants"]
    assert summary["privacy"]["steps"]["aa"] == 2 and summary["privacy"]["steps"]["cc"] == 8
    assert summary["privacy"]["epsilon"]["aa"] <= budget


@pytest.mark.parametrize("private", [False, True])
def test_fedprox_pulls_towards_the_global_encoder_and_survives_opacus_noise(private, monkeypatch):
    """Two full-batch SGD steps from w0: the proximal term adds exactly -lr * mu * (w1 - w0) to the
    second step. Under DP-SGD it must be added after Opacus writes the noised gradient into p.grad
    (added before, it would be overwritten and the difference would be 0)."""
    import securefpt.learning.training as training

    sgd = lambda model, fl: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=fl.lr)  # noqa
    monkeypatch.setattr(dp_training, "make_optimizer", sgd)
    monkeypatch.setattr(training, "make_optimizer", sgd)
    n, lr, mu = 6, 0.5, 0.8
    cfg = _tiny(extra=[f"fl.batch_size={n}", f"fl.lr={lr}"])
    labels, examples = _examples(cfg, n)

    def steps(k: int, proximal_mu: float):
        model = build_model(cfg.model, cfg.peft, len(labels), 0)
        plan = cfg.training_plan().model_copy(update={"local_epochs": k, "proximal_mu": proximal_mu})
        if private:
            dp_train(model, examples, plan, DPSchedule(0.0, 1.0, k, 1e9))
        else:
            train_local(model, examples, plan, seed=0)
        return get_trainable(model.model)

    w0 = get_trainable(build_model(cfg.model, cfg.peft, len(labels), 0).model)
    w1, plain, prox = steps(1, 0.0), steps(2, 0.0), steps(2, mu)
    moved = 0.0
    for name in w0:
        np.testing.assert_allclose(prox[name] - plain[name], -lr * mu * (w1[name] - w0[name]), atol=2e-6,
                                   err_msg=name)
        moved = max(moved, float(np.abs(w1[name] - w0[name]).max()))
    assert moved > 1e-3  # the first step moved, so the proximal term was not zero


def test_a_node_refuses_a_plan_whose_noise_would_swamp_the_signal(dp_fed_cfg, tmp_path):
    """sigma sqrt(d) / B above the limit at the request's public row cap (10: every node trains on
    10 rows) is refused at setup, with the reason code; just below trains."""
    from securefpt.errors import FederationError
    from securefpt.node.budget import MAX_NOISE_TO_SIGNAL

    cfg = dp_fed_cfg("fl.rounds=1", "secagg.enabled=false", "dp.target_epsilon=1000", "data.max_train_per_client=10")
    labels = label_space(cfg.data)
    d = sum(a.size for a in get_trainable(build_model(cfg.model, cfg.peft, len(labels), 0).model).values())
    batch = cfg.fl.batch_size  # q |D_k| = B for every node (each has more than B rows)
    limit_sigma = MAX_NOISE_TO_SIGNAL * batch / d ** 0.5
    with pytest.raises(FederationError, match="noise-swamps-signal"):
        run_federated_simulation(cfg.model_copy(update={"dp": cfg.dp.model_copy(
            update={"noise_multiplier": 1.05 * limit_sigma})}), tmp_path / "swamped", show_progress=False)
    summary = run_federated_simulation(cfg.model_copy(update={"dp": cfg.dp.model_copy(
        update={"noise_multiplier": 0.95 * limit_sigma})}), tmp_path / "trains", show_progress=False)
    assert summary["rounds"][0]["participants"] == ["aa", "bb", "cc"]
    assert summary["privacy"]["noise_multiplier"]["aa"] == pytest.approx(0.95 * limit_sigma)
