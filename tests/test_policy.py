"""Residency policies, attestations and eligibility, on the server and on the client."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from securefpt.coordinator.eligibility import decide_eligibility
from securefpt.errors import ConfigError, FederationError
from securefpt.experiment.loading import load_config
from securefpt.operators.keys import make_federation
from securefpt.protocol.attestation import check_attestation, issue, load_private, new_key, public_raw, save_public
from securefpt.protocol.audit import read_entries
from securefpt.protocol.policy import load_manifests, load_policy

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2027, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def federation(tmp_path):
    """A fresh demo federation (keys, manifests, node configurations) under the repository's example policy."""
    make_federation(tmp_path)
    return tmp_path


def fed_overrides(fed, policy="masakhanews"):
    return [f"policy={fed / 'policies' / (policy + '.yaml')}", f"clients={fed / 'clients'}",
            f"server_key={fed / 'coordinator' / 'audit.key'}"]


def cfg_for(fed, *extra):
    return load_config(None, fed_overrides(fed) + ["dp.enabled=true", "dp.target_epsilon=8", "secagg.enabled=true",
                                                   *extra])


def decide(fed, *extra, now=NOW):
    cfg = cfg_for(fed, *extra)
    return decide_eligibility(load_policy(cfg.policy), cfg, load_manifests(cfg.clients), now)


def test_the_example_policy_and_institutions_in_the_repository_are_valid_and_consistent():
    policy = load_policy(ROOT / "policies" / "masakhanews.yaml")
    assert policy.server.region == "eu-west" and len(policy.regions) == 5
    assert policy.server.require_key_proof is True  # identity by default
    manifests = load_manifests(ROOT / "clients")
    assert len(manifests) == 5
    # every committed attestation verifies with the committed authority key of its region
    authorities = policy.authorities()
    for cid, m in manifests.items():
        assert check_attestation(m.attestation, cid, m.region, authorities[m.region], NOW, m.language) is None, cid
        node = yaml.safe_load((ROOT / "clients" / cid / "node.yaml").read_text())
        assert node["manifest"] == "manifest.yaml" and node["policy"] == "../../policies/masakhanews.yaml"


def test_a_compliant_experiment_includes_all_but_the_region_that_forbids_export(federation):
    d = decide(federation)
    assert {c for c, x in d.items() if x.included} == {"eng-newsroom", "fra-agence", "hau-radio", "swa-gazeti"}
    assert "destination not allowed" in d["yor-iroyin"].reason


@pytest.mark.parametrize("extra,client,why", [
    (["secagg.enabled=false"], "fra-agence", "requires secure aggregation"),
    (["dp.enabled=false"], "hau-radio", "requires differential privacy"),
    (["dp.target_epsilon=10"], "hau-radio", "epsilon 10.0 above region 'ng-north' maximum 8"),
    (["dp.delta=1e-4"], "hau-radio", "delta 0.0001 above region 'ng-north' maximum 1e-05"),
    (["data.languages=[eng, fra, hau, swa]"], "yor-iroyin", "not in this experiment"),
    (["paradigm=centralized"], "eng-newsroom", "pools raw data"),
])
def test_each_rule_excludes_a_violating_client(federation, extra, client, why):
    d = decide(federation, *extra)
    assert not d[client].included and why in d[client].reason
    # the compliant baseline admits this client: the exclusion is the rule's doing
    assert client == "yor-iroyin" or decide(federation)[client].included


def test_cohort_minimums_cascade(federation):
    # eng + fra: a cohort of 2 is below eu-west's minimum of 3; without fra, eng alone
    # is below uk's minimum of 2: nobody may take part
    d = decide(federation, "data.languages=[eng, fra]")
    assert "cohort of 2 below region 'eu-west' minimum 3" in d["fra-agence"].reason
    assert "cohort of 1 below region 'uk' minimum 2" in d["eng-newsroom"].reason
    d = decide(federation, "data.languages=[eng, swa]")
    assert d["eng-newsroom"].included and d["swa-gazeti"].included


def _rewrite(path: Path, **changes):
    path = path / "manifest.yaml" if path.is_dir() else path
    data = yaml.safe_load(path.read_text())
    data["attestation"].update(changes.pop("attestation", {}))
    data.update(changes)
    path.write_text(yaml.safe_dump(data))


def test_forged_expired_and_wrong_authority_attestations_are_rejected(federation):
    clients = federation / "clients"
    # forged: a field changed after signing
    _rewrite(clients / "eng-newsroom", attestation={"expires": "2099-01-01T00:00:00+00:00"})
    # expired: signed properly, but in the past
    fra_key = new_key()
    authority = load_private(clients / "keys" / "eu-west-authority.key")
    old = issue(authority, "fra-agence", "eu-west", "fra", public_raw(fra_key), NOW - timedelta(days=1))
    _rewrite(clients / "fra-agence", attestation=old.to_dict())
    # wrong authority: swa signed by a key the policy does not trust for 'ke'
    rogue = issue(new_key(), "swa-gazeti", "ke", "swa", public_raw(new_key()), NOW + timedelta(days=30))
    _rewrite(clients / "swa-gazeti", attestation=rogue.to_dict())
    d = decide(federation)
    assert "forged attestation" in d["eng-newsroom"].reason
    assert "expired" in d["fra-agence"].reason
    assert "not signed by the authority of region 'ke'" in d["swa-gazeti"].reason
    assert d["hau-radio"].included is False  # and the cohort now falls below ng-north's minimum of 3
    assert "cohort" in d["hau-radio"].reason


def test_a_client_cannot_claim_another_region_with_its_own_valid_attestation(federation):
    # yor-iroyin holds a valid ng-south attestation, but claims uk (which would admit it)
    _rewrite(federation / "clients" / "yor-iroyin", region="uk")
    d = decide(federation)
    assert not d["yor-iroyin"].included
    assert "attestation is for region 'ng-south', not the claimed 'uk'" in d["yor-iroyin"].reason
    # and re-labelling the attestation too breaks the authority's signature
    _rewrite(federation / "clients" / "yor-iroyin", attestation={"region": "uk"})
    assert "not signed by the authority of region 'uk'" in decide(federation)["yor-iroyin"].reason


def test_an_experiment_with_no_valid_cohort_is_refused_before_training(federation, tmp_path):
    from securefpt.engines.simulation import run_federated_simulation

    cfg = cfg_for(federation, "data.languages=[yor]", "secagg.enabled=false")
    with pytest.raises(FederationError, match="yor-iroyin: destination not allowed"):
        run_federated_simulation(cfg, tmp_path / "never", show_progress=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("text,field", [
    ("version: 1\nserver: {region: eu, artifact_regions: [eu]\n", "malformed YAML"),
    ("version: 1\nserver: {region: eu, artifact_regions: [eu]}\nregions: {eu: {authority_key: k.pub, export_to: [eu]}}\n",
     "server.audit_key"),
    ("version: 1\nserver: {region: eu, artifact_regions: [eu], audit_key: k.pub}\nregions: {eu: {authority_key: k.pub, export_to: [eu], colour: red}}\n",
     "regions.eu.colour: unknown key"),
    ("version: 1\nserver: {region: eu, artifact_regions: [eu], audit_key: k.pub}\nregions: {eu: {authority_key: k.pub, export_to: [eu], min_cohort: many}}\n",
     "regions.eu.min_cohort"),
    ("version: 1\nserver: {region: eu, artifact_regions: [eu], audit_key: k.pub}\nregions: {eu: {authority_key: k.pub, export_to: [mars]}}\n",
     "regions.eu.export_to: unknown region 'mars'"),
    ("version: 1\nserver: {region: us, artifact_regions: [eu], audit_key: k.pub}\nregions: {eu: {authority_key: k.pub, export_to: [eu]}}\n",
     "server.region: unknown region 'us'"),
    ("version: 2\nserver: {region: eu, artifact_regions: [eu]}\nregions: {}\n", "version"),
    ("version: 1\nserver: {region: eu, artifact_regions: [eu], audit_key: k.pub}\nregions: {eu: {authority_key: missing.pub, export_to: [eu]}}\n",
     "regions.eu.authority_key"),
])
def test_malformed_policies_name_the_field(tmp_path, text, field):
    save_public(new_key(), tmp_path / "k.pub")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_policy(path)
    assert str(path) in str(exc.value) and field in str(exc.value)


def test_cli_policy_validate_exit_codes(tmp_path):
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "securefpt.cli", "policy", "validate",
                         str(ROOT / "policies" / "masakhanews.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nserver: {region: x}\n")
    res = subprocess.run([sys.executable, "-m", "securefpt.cli", "policy", "validate", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "server.artifact_regions" in res.stderr


def test_a_federated_run_under_the_policy_is_enforced_and_audited(federation, tmp_path, tiny_overrides):
    from securefpt.engines.simulation import run_federated_simulation
    from securefpt.protocol.attestation import load_public
    from securefpt.protocol.audit import read_entries, verify_log

    cfg = load_config(None, tiny_overrides + fed_overrides(federation) + [
        "dp.enabled=true", "dp.target_epsilon=8", "secagg.enabled=true"])
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    clients = summary["clients"]
    assert clients["yor-iroyin"]["included"] is False and "destination not allowed" in clients["yor-iroyin"]["reason"]
    assert clients["hau-radio"] == {"region": "ng-north", "language": "hau", "included": True, "reason": "eligible"}
    assert all(r["participants"] == ["eng", "fra", "hau", "swa"] for r in summary["rounds"])
    assert "yor" not in summary["final"]["accuracy"]
    assert all(0 < summary["privacy"]["epsilon"][lang] <= 8 * 1.01 for lang in ("eng", "fra", "hau", "swa"))

    verdict = verify_log(summary["audit_log"], load_public(summary["audit_public_key"]), summary["audit_head"])
    assert verdict.ok
    events = {e["event"]: e for e in read_entries(summary["audit_log"])}
    assert events["run_start"]["policy_sha256"] and events["run_start"]["config_sha256"]
    assert "destination not allowed" in events["eligibility"]["clients"]["yor-iroyin"]["reason"]
    assert events["artifact"]["storage_region"] == "eu-west" and len(events["artifact"]["sha256"]) == 64
    assert set(events["privacy"]["epsilon"]) == {"eng", "fra", "hau", "swa"}


def test_a_policy_forbids_pooling_raw_data(federation, tmp_path):
    from securefpt.engines.runner import run_experiment

    with pytest.raises(FederationError, match="forbids the centralized paradigm"):
        run_experiment(cfg_for(federation, "paradigm=centralized"), tmp_path / "never", show_progress=False)
    assert not (tmp_path / "never").exists()



def test_an_expiring_attestation_drops_its_node_mid_run_and_withheld_metrics_stay_withheld(
        federation, tmp_path, tiny_overrides, monkeypatch):
    """fra's attestation expires mid-2030, and from round 2 on the coordinator's clock reads July
    2030: fra is decided out again before round 2. Kenya's rules release no evaluation metric:
    swa takes part in every round, and its accuracy never appears."""
    import securefpt.coordinator.run_plan as run_plan
    from securefpt.coordinator.eligibility import participants as real_participants

    authority = load_private(federation / "clients" / "keys" / "eu-west-authority.key")
    fra_key = load_private(federation / "clients" / "keys" / "fra-agence.key")
    expiry = datetime(2030, 6, 1, tzinfo=timezone.utc)
    soon = issue(authority, "fra-agence", "eu-west", "fra", public_raw(fra_key), expiry)
    _rewrite(federation / "clients" / "fra-agence", attestation=soon.to_dict())
    policy_path = federation / "policies" / "masakhanews.yaml"
    policy = yaml.safe_load(policy_path.read_text())
    policy["regions"]["ke"]["release"] = {"eval_metrics": False, "epsilon": True}
    policy_path.write_text(yaml.safe_dump(policy))
    calls = []

    def participants_later(cfg, policy=None, now=None):  # the run's resolution is the first call; then each round
        calls.append(1)
        return real_participants(cfg, policy, now or (datetime(2030, 7, 1, tzinfo=timezone.utc) if len(calls) > 1
                                                      else None))

    import securefpt.coordinator.admission as admission

    monkeypatch.setattr(run_plan, "participants", participants_later)  # the start (resolved once)
    monkeypatch.setattr(admission, "participants", participants_later)  # before each round
    from securefpt.engines.simulation import run_federated_simulation

    cfg = load_config(None, tiny_overrides + fed_overrides(federation) + ["dp.enabled=true", "dp.target_epsilon=8"])
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    r1, r2 = summary["rounds"]
    assert r1["participants"] == ["eng", "fra", "hau", "swa"] and r2["participants"] == ["eng", "hau", "swa"]
    dropped = [e for e in read_entries(summary["audit_log"]) if e["event"] == "eligibility" and e.get("round") == 2]
    assert [(e["client"], e["included"]) for e in dropped] == [("fra", False)]
    assert "attestation expired on 2030-06-01" in dropped[0]["reason"]
    assert all("swa" not in r["accuracy"] for r in summary["rounds"]) and "eng" in r2["accuracy"]
    assert summary["privacy"]["epsilon"]["swa"] is not None  # what ke's rules do release


def test_a_policy_that_forbids_keeping_the_artifact_is_refused_before_training(federation, tmp_path):
    from securefpt.engines.simulation import run_federated_simulation

    policy_path = federation / "policies" / "masakhanews.yaml"
    policy = yaml.safe_load(policy_path.read_text())
    policy["server"]["artifact_regions"] = ["uk"]
    policy_path.write_text(yaml.safe_dump(policy))
    with pytest.raises(FederationError, match="forbids storing the artifact in the coordinator's region 'eu-west'"):
        run_federated_simulation(cfg_for(federation), tmp_path / "never", show_progress=False)
    assert not (tmp_path / "never").exists()


def test_a_cohort_that_setup_failures_leave_below_a_regions_minimum_trains_nothing(
        federation, tmp_path, tiny_overrides, monkeypatch):
    """eng, fra and hau are eligible (a cohort of 3 meets eu-west's and ng-north's minimum of 3);
    hau's node fails at setup: fra's region no longer has its 3, and then eng alone is below uk's 2.
    No round starts, so no node spends any budget."""
    from securefpt.engines.simulation import run_federated_simulation

    monkeypatch.setenv("SECUREFPT_FAULTS", "hau@setup")
    cfg = cfg_for(federation, *tiny_overrides, "data.languages=[eng, fra, hau]")
    with pytest.raises(FederationError, match="no eligible node answered") as failure:
        run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    assert "cohort of 2 below region 'eu-west' minimum 3 after setup" in str(failure.value)
    assert "cohort of 1 below region 'uk' minimum 2 after setup" in str(failure.value)
    assert not list((tmp_path / "run" / "nodes").rglob("ledger-*.json"))
    trained = [json.loads(p.read_text())["trained"] for p in (tmp_path / "run" / "nodes").rglob("runs/*.json")]
    assert trained and all(t == [] for t in trained)


def test_a_dry_run_says_who_takes_part_under_which_rules_and_its_dp_plan_and_writes_nothing(federation, tmp_path):
    """`securefpt run --dry-run` on the demo federation: every institution's inclusion with the
    coordinator's own reason, the bound rules of those included, a DP plan at the row cap that spends
    the target epsilon by the last round, and no run directory."""
    from typer.testing import CliRunner

    from securefpt.cli import app
    from securefpt.coordinator.eligibility import participants

    sets = fed_overrides(federation) + ["model.name=builtin:tiny", "data.max_train_per_client=48"]
    config = ROOT / "securefpt" / "configs" / "demo.yaml"
    done = CliRunner().invoke(app, ["run", str(config), "--dry-run", "--out", str(tmp_path / "out"),
                                    *[x for s in sets for x in ("--set", s)]])
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "out").exists()
    lines = done.output.splitlines()
    who = participants(load_config(config, sets))
    assert any(not p.decision.included for p in who.values())  # the demo policy excludes someone
    for lang, p in who.items():
        verdict = "included" if p.decision.included else "EXCLUDED"
        assert f"  {lang}: {p.client_id} ({p.region}) {verdict}: {p.decision.reason}" in lines
    assert sum("its region's rules: secure aggregation" in x for x in lines) == sum(
        p.decision.included for p in who.values())
    dp = next(x for x in lines if x.startswith("DP: local at 48 rows"))
    spent = float(dp.split(" after all")[0].split()[-1])
    assert spent == pytest.approx(8.0, abs=0.02)  # the plan spends the target (Opacus's tolerance) by the end
    timing = next(x for x in lines if x.startswith("time (compute"))
    assert "a DP step" in timing and "with every node on this machine (simulation)" in timing


def test_a_dry_runs_time_is_its_nodes_steps_at_the_measured_step_times():
    """engines/time_estimate.py: at the row caps, a node's round is its local steps and evaluation
    batches; on one machine the selected nodes' training and every node's evaluation add up, with a
    machine each the slowest node sets the pace; personalization comes once at the end."""
    from securefpt.engines.time_estimate import estimate

    cfg = load_config(None, ["data.languages=[aa,bb,cc]", "data.max_train_per_client=48", "fl.batch_size=16",
                             "fl.local_epochs=2", "data.max_eval_per_client=20", "fl.eval_batch_size=64",
                             "fl.rounds=3", "personalization.adapt_epochs=1"])
    times = {"train_step": 1.0, "eval_batch": 0.5}
    est = estimate(cfg, times, ["aa", "bb", "cc"], None)
    assert est["round_seconds_one_machine"] == 3 * (2 * 3 * 1.0) + 3 * 0.5  # 6 steps a node, one eval batch
    assert est["round_seconds_machine_each"] == 6.0 + 0.5
    assert est["run_seconds_one_machine"] == 3 * 19.5 + 3 * 3.0  # each node adapts one epoch: 3 steps
    assert est["run_seconds_machine_each"] == 3 * 6.5 + 3.0
    dp = load_config(None, ["data.languages=[aa,bb,cc]", "data.max_train_per_client=48", "dp.enabled=true",
                            "fl.fraction_fit=0.67", "fl.rounds=3"])
    est = estimate(dp, {**times, "dp_step": 2.0}, ["aa", "bb", "cc"], 5)  # the DP plan's 5 steps, 2 of 3 selected
    assert est["round_seconds_one_machine"] == 2 * 5 * 2.0 + 3 * 2 * 0.5  # 100 eval rows (no cap): 2 batches
