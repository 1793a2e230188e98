"""The Flower ServerApp: Federated Prompt Averaging (Algorithm 1) over the engine's Grid.

A run: `setup` (every node gets the experiment request and an identity challenge; the
policy's eligibility decisions and the nodes' own answers decide who takes part), then
an evaluation of the initial encoder that also offers round 1. One round: select
m = max(C*K, 1) of the nodes that accepted the offer, train (SecAgg+ or plaintext),
form the new global encoder, and send it to every node in one `evaluate` message that
also offers the next round. The coordinator only proposes: every node checks every
message against its own rules, and a malformed or missing reply counts as a dropout.
"""

from __future__ import annotations

import os
import signal
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid, ServerApp

from securefpt.coordinator.admission import Admission
from securefpt.coordinator.aggregation import select_clients, weighted_average
from securefpt.coordinator.checkpoint import RunState, load_checkpoint, save_checkpoint
from securefpt.coordinator.eligibility import participants
from securefpt.coordinator.metering import MeteredGrid, exchange
from securefpt.coordinator.progress import RunProgress
from securefpt.coordinator.run_dir import RoundRecord, RunRecorder
from securefpt.coordinator.secure_aggregation import SecAggSettings, resolve_settings, secure_fit_round
from securefpt.coordinator.server_optimizer import ServerOptimizer
from securefpt.errors import FederationError, RunInterrupted
from securefpt.learning.data import label_space
from securefpt.learning.modeling import build_model, count_params, get_trainable
from securefpt.protocol import records as R
from securefpt.protocol.experiment import ExperimentConfig
from securefpt.coordinator.verdicts import describe, error_reason
from securefpt.protocol.policy import load_policy


def drill(event: str) -> None:
    """SECUREFPT_FAULTS="coordinator@round-N:sigint": the operator presses Ctrl-C right after round N
    is checkpointed (a drill for the interrupt path, as node faults are in node/guards.py). The
    ServerApp may run in another thread than the one Python delivers signals to: the drill waits
    until the handler has run, so the press lands before the next exchange, as the drill means."""
    from securefpt.coordinator.metering import STOP

    for item in os.environ.get("SECUREFPT_FAULTS", "").split(","):
        if item.strip() == f"coordinator@{event}:sigint":
            os.kill(os.getpid(), signal.SIGINT)
            STOP.wait(timeout=10.0)


def privacy_summary(cfg: ExperimentConfig, reports: dict[str, dict]) -> dict:
    """`summary.json` privacy section from the nodes' latest released reports (null where not released)."""
    langs = cfg.data.languages
    get = lambda key: {lang: reports.get(lang, {}).get(key) for lang in langs}  # noqa: E731
    return {
        "enabled": cfg.dp.enabled,
        "epsilon": get("epsilon"),
        "delta": cfg.dp.delta if cfg.dp.enabled else None,
        "noise_multiplier": get("noise-multiplier") if cfg.dp.enabled else None,
        "sample_rate": get("sample-rate") if cfg.dp.enabled else None,
        "steps": get("steps"),
        "accountant": cfg.dp.accountant if cfg.dp.enabled else None,
        "target_epsilon": cfg.dp.target_epsilon if cfg.dp.enabled else None,
        "max_grad_norm": cfg.dp.max_grad_norm if cfg.dp.enabled else None,
    }


class FederatedPromptAveraging(Admission):
    """Runs one federated experiment on a Grid and writes its run directory."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, grid: Grid, context: Context,
                 show_progress: bool = True, on_receive: Optional[Callable[[Message], None]] = None) -> None:
        self.cfg = cfg
        self.context = context
        self.secagg: Optional[SecAggSettings] = None  # sized in run() for the nodes that take part
        self.grid = MeteredGrid(grid, on_receive=on_receive)
        self.participants = participants(cfg)  # the residency policy's decisions, before any training
        self.policy = load_policy(cfg.policy) if cfg.policy is not None else None  # as at the start of the run
        self.labels = list(cfg.data.labels) if cfg.data.labels else label_space(cfg.data)
        self.request = cfg.request(self.labels)
        self.resumed = load_checkpoint(out_dir, cfg)  # a restarted coordinator goes on from here
        self.recorder = RunRecorder(out_dir, cfg, self.labels, resumed=self.resumed.rounds if self.resumed else None)
        self.progress = RunProgress(enabled=show_progress)
        self.rng = np.random.default_rng(cfg.seed)
        self.languages: dict[int, str] = {}  # node id -> language, fixed at setup (authenticated identity)
        self.witnessed: dict[int, int] = {}  # node id -> the last audit entry it acknowledged witnessing
        self.completed = self.resumed.completed if self.resumed else 0
        self.optimizer = ServerOptimizer(cfg.fl.server_optimizer)

    def _artifact_region(self) -> Optional[str]:
        """Where the final artifact is stored: the coordinator's region (the policy allows it:
        `participants` refuses a run whose policy does not, before any round)."""
        return self.policy.server.region if self.policy is not None else None

    def _in_order(self, langs) -> list[str]:
        chosen = set(langs)
        return [lang for lang in self.cfg.data.languages if lang in chosen]

    # ------------------------------------------------------------------ rounds
    def _train_round(self, server_round: int, selected: list[int], global_arrays) -> tuple:
        """Plaintext round: each selected node returns h_k and |D_k| (Algorithm 1); returns the
        average change sum_k w_k h_k / sum_k w_k - h_g, as a secure round does."""
        parameters = ndarrays_to_parameters(list(global_arrays.values()))
        fitins = FitIns(parameters, {"server-round": server_round})
        msgs = [
            Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in selected
        ]
        task = self.progress.clients(f"round {server_round}: training", len(selected))
        replies = exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout, on_reply=lambda _: task.advance())
        task.done()
        updates, failures, losses, answered = [], [], [], set()
        for node, reply in replies:
            answered.add(node)
            if reply.has_error():
                failures.append((node, error_reason(reply)))
                continue
            update = _plaintext_update(reply, global_arrays, self.secagg_max_weight())
            if update is None:
                failures.append((node, "malformed training reply"))
                continue
            updates.append(update[:2])
            if update[2] is not None:
                losses.append(update[2])
        failures += [(n, "no reply before fl.round_timeout") for n in selected if n not in answered]
        change = None
        if updates:
            average = weighted_average(updates)
            change = OrderedDict((k, average[k].astype(np.float64) - global_arrays[k]) for k in global_arrays)
        failed = dict(failures)
        return change, [n for n in selected if n in answered and n not in failed], failures, losses, None

    def secagg_max_weight(self) -> float:
        return float(self.cfg.secagg.max_weight or self.cfg.data.largest_train() or float("inf"))

    def _secure_train_round(self, server_round: int, selected: list[int], global_arrays) -> tuple:
        """Secure round: the coordinator learns only sum_k w_k (h_k - h_g) (see secure_aggregation.py)."""
        task = self.progress.clients(f"round {server_round}: secure aggregation", 1)
        outcome = secure_fit_round(self.grid, self.context, self.secagg, server_round, selected, global_arrays,
                                   {"server-round": server_round})
        task.advance()
        task.done()
        contributors = [n for n in selected if n in set(outcome.contributors)]
        failures = [(n, outcome.failures.get(n, "dropped out of the secure round")) for n in selected
                    if n not in set(contributors)]
        if outcome.aborted:  # each node's own refusal where it sent one
            failures = [(n, outcome.failures.get(n) or f"round aborted: {outcome.why}") for n in selected]
            self.recorder.audit.append("secure_round_aborted", round=server_round, reason=outcome.why)
            return None, [], failures, [], outcome.why
        return outcome.average_change, contributors, failures, [], None

    def _audit_head(self, node: int) -> ConfigRecord:
        """The log's head for `node` to witness, with the digests since the last head it acknowledged."""
        audit = self.recorder.audit
        start = self.witnessed.get(node, -1) + 1
        return ConfigRecord({"log-id": audit.log_id, "seq": audit.seq - 1, "head": audit.head, "from-seq": start,
                             "digests": audit.digests[start:]})

    def _acknowledged(self, node: int, reply: Message) -> None:
        ack = reply.content.config_records.get(R.WITNESS)
        if ack is not None and isinstance(ack.get("seq"), int):
            self.witnessed[node] = int(ack["seq"])

    def _evaluate(self, server_round: int, nodes: list[int], global_arrays, next_round: int) -> tuple:
        """Send the round's aggregate to every node: released accuracies, privacy reports, and each
        node's answer to the offer of `next_round` (0: none), keyed by the node's authenticated id.
        Each message carries the audit head for the node to witness."""
        content = lambda node: RecordDict({  # noqa: E731
            R.GLOBAL: R.arrays_to_record(global_arrays), R.AUDIT_HEAD: self._audit_head(node),
            R.ROUND: ConfigRecord({"server-round": server_round, "next-round": next_round})})
        msgs = [Message(content(n), dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        task = self.progress.clients(f"round {server_round}: evaluating", len(nodes))
        replies = exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout, on_reply=lambda _: task.advance())
        task.done()
        accuracy, privacy, willing, declined = {}, {}, [], {}
        answered = set()
        for node, reply in replies:
            language = self.languages[node]
            answered.add(node)
            if reply.has_error():
                declined[language] = f"no answer: {error_reason(reply)}"
                continue
            metrics = reply.content.metric_records.get(R.EVAL)
            answer = reply.content.config_records.get(R.ANSWER)
            report = reply.content.config_records.get(R.PRIVACY)
            if metrics is None or answer is None or "accept" not in answer:
                declined[language] = "malformed evaluation reply"
                continue
            self._acknowledged(node, reply)
            if isinstance(metrics.get("accuracy"), float) and 0.0 <= metrics["accuracy"] <= 1.0:
                accuracy[language] = float(metrics["accuracy"])
            if report is not None and len(report):
                privacy[language] = dict(report)
            if bool(answer["accept"]):
                willing.append(node)
            elif next_round:
                declined[language] = describe(str(answer.get("code")), "declined without a reason code")
        for node in nodes:
            if node not in answered:
                declined[self.languages[node]] = "no answer before fl.round_timeout"
        order = self.cfg.data.languages
        return ({lang: accuracy[lang] for lang in order if lang in accuracy},
                {lang: privacy[lang] for lang in order if lang in privacy}, sorted(willing),
                {lang: declined[lang] for lang in order if lang in declined})

    def _initial_state(self, global_arrays: OrderedDict) -> RunState:
        """A fresh start, or the checkpoint of a run whose coordinator restarted; its
        rounds are the recorder's (one list, which every completed round extends)."""
        if self.resumed is None:
            return RunState(global_arrays=global_arrays, rounds=self.recorder.rounds)
        state = self.resumed
        state.rounds = self.recorder.rounds
        order = list(global_arrays)  # the model's parameter order, which the nodes share
        state.global_arrays = OrderedDict((k, state.global_arrays[k]) for k in order)
        if state.best_arrays is not None:
            state.best_arrays = OrderedDict((k, state.best_arrays[k]) for k in order)
        self.rng.bit_generator.state = state.rng_state
        self.optimizer.load_flat_state(state.optimizer_state)
        self.progress.console.print(f"resuming after round {state.completed} (checkpoint in {self.recorder.out_dir})")
        return state

    def _personalize(self, nodes: list[int], final_arrays) -> Optional[dict[str, float]]:
        """Each node adapts the final encoder on its own data and keeps the result (node/personal.py);
        the accuracies its rules release come back (None: the experiment does not personalize)."""
        plan = self.cfg.personalization
        if not plan.planned:
            return None
        content = RecordDict({R.GLOBAL: R.arrays_to_record(final_arrays)})
        msgs = [Message(content, dst_node_id=n, message_type=R.PERSONALIZE_QUERY) for n in nodes]
        task = self.progress.clients(f"personalizing ({plan.adapt_epochs} local epochs)", len(nodes))
        replies = exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout, on_reply=lambda _: task.advance())
        task.done()
        accuracy = {}
        for node, reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get(R.EVAL)
            value = metrics.get("accuracy") if metrics is not None else None
            if isinstance(value, float) and 0.0 <= value <= 1.0:
                accuracy[self.languages[node]] = value
            elif reply.has_error():
                self.recorder.audit.append("personalization_failed", client=self.languages[node],
                                           reason=error_reason(reply))
        self.recorder.audit.append("personalized", accuracy=accuracy)
        return {lang: accuracy[lang] for lang in self.cfg.data.languages if lang in accuracy}

    def _witness_end(self, nodes: list[int]) -> None:
        """The final audit head, for every node to witness (the entries after the last evaluation)."""
        msgs = [Message(RecordDict({R.AUDIT_HEAD: self._audit_head(n)}), dst_node_id=n,
                        message_type=R.WITNESS_QUERY) for n in nodes]
        for node, reply in exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout):
            if not reply.has_error():
                self._acknowledged(node, reply)

    def run(self) -> dict:
        """The run, with the audit log open (and its writer's lock held) for as long as it lasts."""
        try:
            return self._run()
        except RunInterrupted:
            self.recorder.audit.append("run_interrupted", after_round=self.completed)
            raise RunInterrupted(f"interrupted: {self.recorder.out_dir} keeps its checkpoint after round "
                                 f"{self.completed}; run the same command to resume") from None
        finally:
            self.progress.stop()
            self.recorder.audit.close()

    def _run(self) -> dict:
        cfg = self.cfg
        audit = self.recorder.audit
        assembled = build_model(cfg.model, cfg.peft, len(self.labels), cfg.seed)
        shared = cfg.personalization.travels  # a local head stays on each node
        state = self._initial_state(OrderedDict((k, v) for k, v in get_trainable(assembled.model).items() if shared(k)))
        trainable, total = count_params(assembled.model)
        del assembled

        self._setup(self._wait_for_nodes(len(cfg.data.languages)))
        clients, eligible = self._admit()
        audit.append("eligibility", round=state.completed, clients={k: asdict(v) for k, v in clients.items()})
        if not eligible:
            raise FederationError("no eligible node answered: " + "; ".join(f"{k}: {v.reason}" for k, v in clients.items()))
        if cfg.secagg.enabled:  # the protocol is sized for the nodes that actually take part
            self.secagg = resolve_settings(cfg, len(eligible))

        last_round = state.completed if state.stopped else cfg.fl.rounds
        stopped = "early stopping" if state.stopped else None
        self.progress.start(last_round - state.completed)
        # the current encoder, evaluated once more; its message offers the first round to train
        _, _, willing, declined = self._evaluate(state.completed, eligible, state.global_arrays,
                                                 state.completed + 1 if state.completed < last_round else 0)
        for server_round in range(state.completed + 1, last_round + 1):
            start = time.perf_counter()
            up0, down0 = self.grid.snapshot()
            if cfg.policy is not None and server_round > 1:
                eligible = self._recheck_policy(server_round, eligible)
            willing = [n for n in willing if n in eligible]
            for lang, why in declined.items():
                audit.append("declined", round=server_round, client=lang, reason=why)
            if not willing:
                why = "; ".join(sorted(set(declined.values()))) or "no node answered"
                audit.append("no_willing_nodes", round=server_round, reasons=sorted(set(declined.values())))
                stopped = f"round {server_round}: every node declined ({why})"
                self.progress.console.print(f"{stopped}; stopping", highlight=False)
                break
            selected = self._within_minimums(server_round,
                                             select_clients(willing, cfg.fl.fraction_fit, self.rng,
                                                            population=len(eligible)))
            train = self._secure_train_round if self.secagg is not None else self._train_round
            train_start = time.perf_counter()
            if self.secagg is not None and len(selected) < max(2, self.secagg.min_cohort):
                change, contributors, failures, losses, why = None, [], [
                    (n, f"secure aggregation needs {max(2, self.secagg.min_cohort)} nodes") for n in selected], [], None
            else:
                change, contributors, failures, losses, why = train(server_round, selected, state.global_arrays)
            train_seconds = time.perf_counter() - train_start
            aborted = change is None
            if not aborted:
                state.global_arrays = self.optimizer.step(server_round, state.global_arrays, change)
                state.optimizer_state = self.optimizer.flat_state()
            state.secure_rounds.append({"round": server_round, "participants": self._in_order(
                self.languages[n] for n in contributors), "dropouts": self._in_order(self.languages[n] for n, _ in failures),
                "aborted": aborted})
            next_round = server_round + 1 if server_round < last_round else 0
            round_declined = declined
            accuracy, privacy, willing, declined = self._evaluate(server_round, eligible, state.global_arrays,
                                                                  next_round)
            if privacy:
                state.latest_privacy.update(privacy)
                audit.append("privacy", round=server_round,
                             epsilon={lang: p.get("epsilon") for lang, p in privacy.items()})
            up1, down1 = self.grid.snapshot()
            record = RoundRecord(
                round=server_round, accuracy=accuracy, seconds=time.perf_counter() - start,
                train_seconds=train_seconds, participants=self._in_order(self.languages[n] for n in contributors),
                failures=sorted(f"{self.languages.get(n, n)}: {why}" for n, why in failures),
                train_loss=float(np.mean(losses)) if losses else None, bytes_up=up1 - up0, bytes_down=down1 - down0,
                aborted=aborted, declined=round_declined,
                epsilon={lang: p["epsilon"] for lang, p in privacy.items() if "epsilon" in p} or None,
            )
            self.recorder.add_round(record)
            self.progress.round_done(record)
            state.stopped = state.observe(record, state.global_arrays, cfg.fl.patience)
            state.completed, state.rng_state = server_round, self.rng.bit_generator.state
            save_checkpoint(self.recorder.out_dir, cfg, state, self.recorder.key)
            self.completed = server_round
            drill(f"round-{server_round}")
            if state.stopped:
                audit.append("early_stop", round=server_round, best_round=state.best_round)
                stopped = "early stopping"
                break
        self.progress.stop()
        if not self.recorder.rounds:
            raise FederationError("no round completed: every node declined the first round")

        final_record, final_arrays = self.recorder.rounds[-1], state.global_arrays
        if cfg.fl.patience is not None and state.best_round is not None:
            final_record, final_arrays = state.best_record(), state.best_arrays
        self.recorder.save_artifact(final_arrays, region=self._artifact_region())
        personalized = self._personalize(eligible, final_arrays)
        secure = {"enabled": self.secagg is not None}
        if self.secagg is not None:
            secure.update(settings=asdict(self.secagg), rounds=state.secure_rounds,
                          aborted_rounds=[r["round"] for r in state.secure_rounds if r["aborted"]])
        summary = self.recorder.write_summary(final_record, trainable, total, clients, secure_aggregation=secure,
                                              privacy=privacy_summary(cfg, state.latest_privacy),
                                              extra={"stopped_before_the_last_round": stopped},
                                              personalized=personalized)
        self._witness_end(eligible)
        return summary


def _plaintext_update(reply: Message, global_arrays, max_weight: float):
    """(arrays, |D_k|, loss or None) of a plaintext training reply, or None when it is malformed:
    wrong names or shapes, non-finite values, or a weight that is not a positive count."""
    try:
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
        values = parameters_to_ndarrays(fitres.parameters)
    except Exception:  # a reply the codec cannot read is that node dropping out
        return None
    names = list(global_arrays)
    if len(values) != len(names) or any(v.shape != global_arrays[n].shape for n, v in zip(names, values)):
        return None
    if not all(np.isfinite(v).all() for v in values):
        return None
    weight = fitres.num_examples
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 < weight <= max_weight:
        return None
    loss = fitres.metrics.get("loss")
    return OrderedDict(zip(names, values)), float(weight), float(loss) if isinstance(loss, float) else None


def build_server_app(cfg: ExperimentConfig, out_dir: Path, show_progress: bool = True,
                     on_error: Optional[Callable[[BaseException], None]] = None,
                     on_receive: Optional[Callable[[Message], None]] = None) -> ServerApp:
    """A ServerApp bound to an experiment (securefpt's simulation engine; `flwr run .` loads
    securefpt/engines/flower_run.py instead).

    `on_error` receives an exception raised by the run, so an in-process caller can
    re-raise it after the engine has shut down; `on_receive` sees every message the
    coordinator receives (for audits and tests).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            FederatedPromptAveraging(cfg, out_dir, grid, context, show_progress, on_receive).run()
        except BaseException as exc:
            if on_error is None:
                raise
            on_error(exc)

    return app
