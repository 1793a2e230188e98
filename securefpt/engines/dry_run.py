"""`securefpt run --dry-run`: what a run would do, from the experiment and the policy alone.

Nothing is trained, started or written. Eligibility is the coordinator's own decision
(coordinator/eligibility.py) with each exclusion's reason; the rules that bind an included
node are its region's in the policy (each node enforces its own copy); the DP plan is the one
a node would make at the request's public row cap (without a cap it depends on each node's
private row count, and the plan says so); the SecAgg+ settings are the coordinator's resolved
ones; bytes per round count the encoder down and the update up for each selected node, as
float32 (SecAgg+'s key exchange and the masked vector's integer encoding are extra); the
time is estimated from this model's step time measured here (engines/time_estimate.py).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from securefpt.coordinator.eligibility import participants
from securefpt.coordinator.secure_aggregation import resolve_settings
from securefpt.engines.dp_planning import with_planned_noise
from securefpt.engines.preflight import task_labels
from securefpt.engines.time_estimate import describe, estimate, step_times
from securefpt.experiment.config import ExperimentConfig
from securefpt.learning.modeling import build_model, get_trainable
from securefpt.node.budget import epsilon_of, plan_privacy
from securefpt.protocol.policy import load_policy


def plan_run(cfg: ExperimentConfig) -> dict[str, Any]:
    """The run's plan as a dict (printed by the CLI, read by tools)."""
    who = participants(cfg)
    regions = load_policy(cfg.policy).regions if cfg.policy is not None else {}
    nodes = {}
    for lang, p in who.items():
        rule = regions.get(p.region) if p.region else None
        nodes[lang] = {"client": p.client_id, "region": p.region, "included": p.decision.included,
                       "reason": p.decision.reason,
                       "rules": rule.model_dump(mode="json", exclude={"authority_key"}) if rule else None}
    included = [lang for lang, n in nodes.items() if n["included"]]
    labels = task_labels(cfg)
    cfg = with_planned_noise(cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": labels})}))
    request = cfg.request(labels)
    model = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    arrays = get_trainable(model.model)
    shared = sum(a.size for name, a in arrays.items() if request.personalization.travels(name))
    selected = max(int(cfg.fl.fraction_fit * len(included)), 1) if included else 0  # Algorithm 1's m
    secagg = resolve_settings(cfg, selected) if cfg.secagg.enabled and selected else None
    dp = _dp_plan(cfg, request, shared)
    time_needed = estimate(cfg, step_times(cfg, model, len(labels)), included,
                           dp.get("steps_per_round") if dp else None)
    return {
        "name": cfg.name, "paradigm": cfg.paradigm, "model": cfg.model.name, "peft_method": cfg.peft.method,
        "labels": labels, "rounds": cfg.fl.rounds, "nodes": nodes, "selected_per_round": selected,
        "trainable_params": int(sum(a.size for a in arrays.values())), "shared_params": int(shared),
        "bytes_per_round": int(2 * 4 * shared * selected),
        "secure_aggregation": None if secagg is None else {
            "num_shares": secagg.num_shares, "reconstruction_threshold": secagg.reconstruction_threshold,
            "clipping_range": secagg.clipping_range, "quantization_range": secagg.quantization_range,
            "modulus_range": secagg.modulus_range, "max_weight": secagg.max_weight},
        "dp": dp, "time": time_needed,
    }


def _dp_plan(cfg: ExperimentConfig, request, shared: int) -> Optional[dict[str, Any]]:
    if not cfg.dp.enabled:
        return None
    cap = request.training.max_train
    out: dict[str, Any] = {"mode": cfg.dp.mode, "delta": cfg.dp.delta, "target_epsilon": cfg.dp.target_epsilon,
                           "max_grad_norm": cfg.dp.max_grad_norm, "at_rows": cap}
    if cap is None:
        out["note"] = "no row cap: each node plans at its own (private) row count"
        return out
    plan = plan_privacy(request, cap, shared)
    with warnings.catch_warnings():  # one round at a large epsilon sits at the accountant's edge: expected
        warnings.simplefilter("ignore", UserWarning)
        first = epsilon_of([plan.round_spend()], plan.delta, plan.accountant)
        last = epsilon_of([plan.round_spend()] * plan.planned_rounds, plan.delta, plan.accountant)
    out.update({"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                "steps_per_round": plan.steps_per_round, "accountant": plan.accountant,
                "epsilon_after_one_round": first, "epsilon_after_all_rounds": last})
    return out


def print_plan(plan: dict[str, Any], console) -> None:
    """The plan, one line per fact, for the operator (`securefpt run --dry-run`)."""
    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"{plan['name']}: {plan['paradigm']}, {plan['model']}, {plan['peft_method']}, {plan['rounds']} rounds, "
        f"{len(plan['labels'])} labels ({', '.join(plan['labels'])})")
    for lang, n in plan["nodes"].items():
        where = f"{n['client']} ({n['region']})" if n["region"] else n["client"]
        say(f"  {lang}: {where} {'included' if n['included'] else 'EXCLUDED'}: {n['reason']}")
        if n["included"] and n["rules"]:
            r = n["rules"]
            dp = r["dp"]
            secure = "required" if r["require_secure_aggregation"] else "optional"
            say(f"      its region's rules: secure aggregation {secure}"
                f", DP {'required' if dp['required'] else 'optional'} (modes {', '.join(dp['modes'])}"
                + (f", epsilon <= {dp['max_epsilon']:g}" if dp.get("max_epsilon") is not None else "")
                + f"), cohort >= {r['min_cohort']}, export to {', '.join(r['export_to'] or ['any region'])}")
    say(f"{plan['selected_per_round']} nodes a round; {plan['shared_params']:,} of {plan['trainable_params']:,} "
        f"trainable parameters travel: {plan['bytes_per_round']:,} bytes a round as float32 (SecAgg+ adds its own)")
    s = plan["secure_aggregation"]
    say("SecAgg+: off" if s is None else
        f"SecAgg+: {s['num_shares']} shares, threshold {s['reconstruction_threshold']}, clipping range "
        f"{s['clipping_range']:g}, quantization 2^{s['quantization_range'].bit_length() - 1}, "
        f"modulus 2^{s['modulus_range'].bit_length() - 1}, max weight {s['max_weight']:g}")
    dp = plan["dp"]
    if dp is None:
        say("DP: off")
    elif "note" in dp:
        say(f"DP: {dp['mode']}, target epsilon {dp['target_epsilon']}, delta {dp['delta']:g}; {dp['note']}")
    else:
        say(f"DP: {dp['mode']} at {dp['at_rows']} rows: noise multiplier {dp['noise_multiplier']:.3f}, sample rate "
            f"{dp['sample_rate']:.4f}, {dp['steps_per_round']} steps a round ({dp['accountant']}); epsilon "
            f"{dp['epsilon_after_one_round']:.3f} after one round, {dp['epsilon_after_all_rounds']:.3f} after all "
            f"(delta {dp['delta']:g})")
    say(describe(plan["time"]))
    say("dry run: nothing was trained or written")
