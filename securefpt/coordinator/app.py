"""The Flower ServerApp: Federated Prompt Averaging (Algorithm 1) over the engine's Grid.

A run reads top-down in `_run`: prepare (the model's shared encoder, or the checkpoint a
restarted coordinator resumes from), admit (setup: every node gets the experiment request
and an identity challenge; the policy's decisions and the nodes' own answers decide who
takes part), an evaluation of the current encoder that also offers the next round, one
line per round, finish (artifact, personalization, summary, the last witness).

One round (`_round`): select m = max(C*K, 1) of the nodes that accepted the offer, train
(SecAgg+ or plaintext), form the new global encoder, checkpoint it, and send it to every
node in one `evaluate` message that also offers the next round; checkpoint again. The
coordinator only proposes: every node checks every message against its own rules, and a
malformed or missing reply counts as a dropout (coordinator/phases.py triages them).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict
from typing import Callable, Optional

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from securefpt.coordinator.admission import Admission
from securefpt.coordinator.aggregation import select_clients
from securefpt.coordinator.checkpoint import RunState, save_checkpoint
from securefpt.coordinator.interrupts import drill
from securefpt.coordinator.metering import MeteredGrid, Traffic
from securefpt.coordinator.phases import EvalOutcome, RoundPhases, TrainOutcome
from securefpt.coordinator.progress import RunProgress
from securefpt.coordinator.run_dir import RoundRecord, RunRecorder, privacy_summary
from securefpt.coordinator.run_plan import RunPlan
from securefpt.coordinator.secure_aggregation import resolve_settings
from securefpt.coordinator.server_optimizer import ServerOptimizer
from securefpt.errors import FederationError, RunInterrupted
from securefpt.learning.modeling import build_model, count_params, get_trainable


class FederatedPromptAveraging:
    """Runs one federated experiment (resolved into a RunPlan) on a Grid and writes its run directory."""

    def __init__(self, plan: RunPlan, grid: Grid, context: Context, show_progress: bool = True,
                 on_receive: Optional[Callable[[Message], None]] = None,
                 on_aggregate: Optional[Callable[[int, dict], None]] = None) -> None:
        cfg = self.cfg = plan.cfg
        self.grid = MeteredGrid(grid, on_receive=on_receive)
        self.on_aggregate = on_aggregate
        self.plan = plan  # the policy's decisions, labels, request, and where a restarted coordinator goes on
        self.recorder = RunRecorder(plan.out_dir, cfg, plan.request, policy=plan.policy,
                                    resumed=self.plan.resumed.rounds if self.plan.resumed else None)
        self.progress = RunProgress(enabled=show_progress)
        self.rng = np.random.default_rng(cfg.seed)
        self.admission = Admission(cfg, self.grid, context.run_id, plan.policy, plan.participants, plan.request,
                                   self.recorder.audit)
        self.languages = self.admission.languages  # node id -> language, fixed at setup (authenticated identity)
        self.phases = RoundPhases(cfg, self.grid, context, self.progress, self.recorder.audit, self.languages)
        self.optimizer = ServerOptimizer(cfg.fl.server_optimizer)
        self.state: Optional[RunState] = None

    def _artifact_region(self) -> Optional[str]:
        """Where the final artifact is stored: the coordinator's region (the policy allows it:
        `participants` refuses a run whose policy does not, before any round)."""
        return self.plan.policy.server.region if self.plan.policy is not None else None

    def _in_order(self, nodes) -> list[str]:
        chosen = {self.languages.get(n, n) for n in nodes}
        return [lang for lang in self.cfg.data.languages if lang in chosen]

    def run(self) -> dict:
        """The run, with the audit log open (and its writer's lock held) for as long as it lasts."""
        try:
            return self._run()
        except RunInterrupted:
            state = self.state
            done = state.completed if state else (self.plan.resumed.completed if self.plan.resumed else 0)
            self.recorder.audit.append("run_interrupted", after_round=done)
            pending = (f" (round {state.pending.round} is aggregated; its evaluation is redone)"
                       if state is not None and state.pending is not None else "")
            raise RunInterrupted(f"interrupted: {self.recorder.out_dir} keeps its checkpoint after round "
                                 f"{done}{pending}; run the same command to resume") from None
        finally:
            self.progress.stop()
            self.recorder.audit.close()

    def _run(self) -> dict:
        state, params = self._prepare()
        eligible, clients = self._admit_nodes(state)
        last_round = state.completed if state.stopped else self.cfg.fl.rounds
        self.progress.start(last_round - state.completed)
        offer, stopped = self._resume_evaluation(state, eligible, last_round)
        for server_round in range(state.completed + 1, last_round + 1):
            if stopped:
                break
            offer, stopped = self._round(server_round, state, eligible, offer, last_round)
        self.progress.stop()
        return self._finish(state, eligible, clients, params, stopped)

    # ------------------------------------------------------------------ before the first round
    def _prepare(self) -> tuple[RunState, tuple[int, int]]:
        """The shared encoder to start from (a fresh model's, or the resumed checkpoint's) and the
        model's (trainable, total) parameter counts."""
        cfg = self.cfg
        assembled = build_model(cfg.model, cfg.peft, len(self.plan.labels), cfg.seed)
        shared = cfg.personalization.travels  # a local head stays on each node
        initial = OrderedDict((k, v) for k, v in get_trainable(assembled.model).items() if shared(k))
        params = count_params(assembled.model)
        del assembled
        self.state = self._initial_state(initial)
        return self.state, params

    def _initial_state(self, global_arrays: OrderedDict) -> RunState:
        """A fresh start, or the checkpoint of a run whose coordinator restarted; its
        rounds are the recorder's (one list, which every completed round extends)."""
        if self.plan.resumed is None:
            return RunState(global_arrays=global_arrays, rounds=self.recorder.rounds)
        state = self.plan.resumed
        state.rounds = self.recorder.rounds
        order = list(global_arrays)  # the model's parameter order, which the nodes share
        state.global_arrays = OrderedDict((k, state.global_arrays[k]) for k in order)
        if state.best_arrays is not None:
            state.best_arrays = OrderedDict((k, state.best_arrays[k]) for k in order)
        self.rng.bit_generator.state = state.rng_state
        self.optimizer.load_flat_state(state.optimizer_state)
        pending = f" (round {state.pending.round} aggregated)" if state.pending is not None else ""
        self.progress.console.print(f"resuming after round {state.completed}{pending} "
                                    f"(checkpoint in {self.recorder.out_dir})")
        return state

    def _admit_nodes(self, state: RunState) -> tuple[list[int], dict]:
        """Setup, then who takes part (recorded); the SecAgg+ settings are sized for them."""
        nodes = self.admission.wait_for_nodes(len(self.cfg.data.languages))
        drill("setup")
        self.admission.setup(nodes)
        clients, eligible = self.admission.admit()
        self.recorder.audit.append("eligibility", round=state.completed,
                                   clients={k: asdict(v) for k, v in clients.items()})
        if not eligible:
            raise FederationError("no eligible node answered: " + "; ".join(f"{k}: {v.reason}"
                                                                          for k, v in clients.items()))
        if self.cfg.secagg.enabled:
            self.phases.secagg = resolve_settings(self.cfg, len(eligible))
        return eligible, clients

    def _resume_evaluation(self, state: RunState, eligible: list[int],
                           last_round: int) -> tuple[EvalOutcome, Optional[str]]:
        """Evaluate the current encoder once more; its message offers the next round. A round the
        checkpoint holds as aggregated but not evaluated is completed by this evaluation."""
        if state.pending is None:
            nxt = state.completed + 1 if state.completed < last_round else 0
            return self.phases.evaluate(state.completed, eligible, state.global_arrays, nxt), (
                "early stopping" if state.stopped else None)
        record, start, snapshot = state.pending, time.perf_counter(), self.grid.snapshot()
        nxt = record.round + 1 if record.round < last_round else 0
        evaluated = self.phases.evaluate(record.round, eligible, state.global_arrays, nxt)
        return evaluated, self._complete_round(state, record, evaluated, start, snapshot)

    # ------------------------------------------------------------------ one round
    def _round(self, server_round: int, state: RunState, eligible: list[int], offer: EvalOutcome,
               last_round: int) -> tuple[EvalOutcome, Optional[str]]:
        """Train, aggregate, evaluate: the next round's offer, and why the run stops (None: it goes on)."""
        start, snapshot = time.perf_counter(), self.grid.snapshot()
        if self.cfg.policy is not None and server_round > 1:
            eligible[:] = self.admission.recheck_policy(server_round, eligible)
        willing = [n for n in offer.willing if n in eligible]
        for lang, why in offer.declined.items():
            self.recorder.audit.append("declined", round=server_round, client=lang, reason=why)
        if not willing:
            return offer, self._nobody_willing(server_round, offer)
        selected = self.admission.within_minimums(server_round, select_clients(
            willing, self.cfg.fl.fraction_fit, self.rng, population=len(eligible)))
        trained = self.phases.train(server_round, selected, state.global_arrays)
        record = self._aggregate(server_round, state, trained, offer, start, snapshot)
        nxt = server_round + 1 if server_round < last_round else 0
        start, snapshot = time.perf_counter(), self.grid.snapshot()
        evaluated = self.phases.evaluate(server_round, eligible, state.global_arrays, nxt)
        return evaluated, self._complete_round(state, record, evaluated, start, snapshot)

    def _nobody_willing(self, server_round: int, offer: EvalOutcome) -> str:
        why = "; ".join(sorted(set(offer.declined.values()))) or "no node answered"
        self.recorder.audit.append("no_willing_nodes", round=server_round, reasons=sorted(set(offer.declined.values())))
        stopped = f"round {server_round}: every node declined ({why})"
        self.progress.console.print(f"{stopped}; stopping", highlight=False)
        return stopped

    def _aggregate(self, server_round: int, state: RunState, trained: TrainOutcome, offer: EvalOutcome,
                   start: float, snapshot: Traffic) -> RoundRecord:
        """The new global encoder (the server optimizer's step), checkpointed before it is evaluated:
        an interruption from here on never asks a node to train this round again."""
        if not trained.aborted:
            if self.on_aggregate is not None:
                self.on_aggregate(server_round, dict(trained.change))
            state.global_arrays = self.optimizer.step(server_round, state.global_arrays, trained.change)
            state.optimizer_state = self.optimizer.flat_state()
        participants_, dropouts = self._in_order(trained.contributors), self._in_order(n for n, _ in trained.failures)
        state.secure_rounds.append({"round": server_round, "participants": participants_, "dropouts": dropouts,
                                    "aborted": trained.aborted})
        traffic = self.grid.snapshot().since(snapshot)
        seconds = time.perf_counter() - start
        state.pending = RoundRecord(
            round=server_round, accuracy={}, seconds=seconds, train_seconds=seconds, participants=participants_,
            failures=sorted(f"{self.languages.get(n, n)}: {why}" for n, why in trained.failures),
            train_loss=float(np.mean(trained.losses)) if trained.losses else None,
            bytes_up=traffic.up, bytes_down=traffic.down, exchanges=traffic.exchanges,
            exchange_seconds=[round(t, 3) for t in traffic.exchange_seconds], aborted=trained.aborted,
            declined=offer.declined)
        state.rng_state = self.rng.bit_generator.state
        save_checkpoint(self.recorder.out_dir, self.cfg, state, self.recorder.key)
        drill(f"round-{server_round}:aggregated")
        return state.pending

    def _complete_round(self, state: RunState, record: RoundRecord, evaluated: EvalOutcome, start: float,
                        snapshot: Traffic) -> Optional[str]:
        """Record an evaluated round and checkpoint it; "early stopping" when patience ran out."""
        if evaluated.privacy:
            state.latest_privacy.update(evaluated.privacy)
            alone = {lang: p["epsilon-alone"] for lang, p in evaluated.privacy.items() if "epsilon-alone" in p}
            self.recorder.audit.append("privacy", round=record.round,
                                       epsilon={lang: p.get("epsilon") for lang, p in evaluated.privacy.items()},
                                       **({"epsilon_alone": alone} if alone else {}))
        traffic = self.grid.snapshot().since(snapshot)
        record.accuracy = evaluated.accuracy
        record.epsilon = {lang: p["epsilon"] for lang, p in evaluated.privacy.items() if "epsilon" in p} or None
        record.seconds += time.perf_counter() - start
        record.bytes_up += traffic.up
        record.bytes_down += traffic.down
        record.exchanges += traffic.exchanges
        record.exchange_seconds += [round(t, 3) for t in traffic.exchange_seconds]
        self.recorder.add_round(record)
        self.progress.round_done(record)
        state.stopped = state.observe(record, state.global_arrays, self.cfg.fl.patience)
        state.completed, state.pending = record.round, None
        save_checkpoint(self.recorder.out_dir, self.cfg, state, self.recorder.key)
        drill(f"round-{record.round}")
        if state.stopped:
            self.recorder.audit.append("early_stop", round=record.round, best_round=state.best_round)
            return "early stopping"
        return None

    # ------------------------------------------------------------------ after the last round
    def _finish(self, state: RunState, eligible: list[int], clients: dict, params: tuple[int, int],
                stopped: Optional[str]) -> dict:
        """The artifact, each node's personalization, summary.json, and the last head to witness."""
        if not self.recorder.rounds:
            raise FederationError("no round completed: every node declined the first round")
        final_record, final_arrays = self.recorder.rounds[-1], state.global_arrays
        if self.cfg.fl.patience is not None and state.best_round is not None:
            final_record, final_arrays = state.best_record(), state.best_arrays
        self.recorder.save_artifact(final_arrays, region=self._artifact_region())
        personalized = self.phases.personalize(eligible, final_arrays)
        secure: dict = {"enabled": self.phases.secagg is not None}
        if self.phases.secagg is not None:
            secure.update(settings=asdict(self.phases.secagg), rounds=state.secure_rounds,
                          aborted_rounds=[r["round"] for r in state.secure_rounds if r["aborted"]])
        refused = stopped is not None and stopped != "early stopping"
        summary = self.recorder.write_summary(final_record, *params, clients, secure_aggregation=secure,
                                              privacy=privacy_summary(self.cfg, state.latest_privacy),
                                              personalized=personalized, stopped=stopped,
                                              stopped_by_refusals=refused)
        self.phases.witness_end(eligible)
        return summary


def build_server_app(plan: RunPlan, show_progress: bool = True,
                     on_error: Optional[Callable[[BaseException], None]] = None,
                     on_receive: Optional[Callable[[Message], None]] = None,
                     on_aggregate: Optional[Callable[[int, dict], None]] = None) -> ServerApp:
    """A ServerApp bound to an experiment (securefpt's simulation engine; `flwr run .` loads
    securefpt/engines/flower_run.py instead).

    `on_error` receives an exception raised by the run, so an in-process caller can
    re-raise it after the engine has shut down; `on_receive` sees every message the
    coordinator receives (for audits and tests); `on_aggregate` each round's unmasked aggregate
    (round, arrays) before the server optimizer's step: all the coordinator learns of a round under
    SecAgg+ (the privacy audit's view of the coordinator).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            FederatedPromptAveraging(plan, grid, context, show_progress, on_receive, on_aggregate).run()
        except BaseException as exc:
            if on_error is None:
                raise
            on_error(exc)

    return app
