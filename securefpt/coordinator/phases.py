"""The exchanges of one round, each with a typed outcome: train (plaintext or SecAgg+), evaluate,
and after the last round personalize and witness.

Every reply is triaged here: an error reply, a malformed reply or no reply before
`fl.round_timeout` is that node dropping out of the phase, never an exception. The
coordinator's loop (coordinator/app.py) only reads the outcomes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from securefpt.coordinator.aggregation import robust_average
from securefpt.coordinator.audit_log import AuditLog
from securefpt.coordinator.interrupts import drill
from securefpt.coordinator.metering import MeteredGrid, exchange
from securefpt.coordinator.progress import RunProgress
from securefpt.coordinator.secure_aggregation import SecAggSettings, secure_fit_round
from securefpt.coordinator.verdicts import describe, error_reason
from securefpt.experiment.config import ExperimentConfig
from securefpt.protocol import records as R
from securefpt.protocol.messages import FIT_ROUND, Answer, AuditHead, Malformed, RoundOffer, WitnessAck

Arrays = "OrderedDict[str, np.ndarray]"


@dataclass
class TrainOutcome:
    """What a training phase gave: the average change of the contributors, or None (aborted)."""

    change: Optional[Arrays]
    contributors: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # node -> why it did not contribute
    losses: list[float] = field(default_factory=list)  # plaintext rounds, where nodes release them

    @property
    def aborted(self) -> bool:
        return self.change is None


@dataclass
class EvalOutcome:
    """The nodes' answers to an evaluation message (keyed by language, except `willing`)."""

    accuracy: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, dict] = field(default_factory=dict)
    willing: list[int] = field(default_factory=list)  # nodes that accepted the next round's offer
    declined: dict[str, str] = field(default_factory=dict)  # language -> why it sits the next round out


class RoundPhases:
    """Sends each phase's messages and triages the replies; `languages` maps authenticated node ids."""

    def __init__(self, cfg: ExperimentConfig, grid: MeteredGrid, context: Context, progress: RunProgress,
                 audit: AuditLog, languages: dict[int, str]) -> None:
        self.cfg, self.grid, self.context, self.progress, self.audit = cfg, grid, context, progress, audit
        self.languages = languages
        self.secagg: Optional[SecAggSettings] = None  # set once the cohort is known
        self.witnessed: dict[int, int] = {}  # node id -> the last audit entry it acknowledged witnessing

    def _exchange(self, label: str, msgs: list[Message]) -> list[tuple[int, Message]]:
        task = self.progress.clients(label, len(msgs))
        replies = exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout, on_reply=lambda _: task.advance())
        task.done()
        return replies

    def max_weight(self) -> float:
        return float(self.cfg.secagg.max_weight or self.cfg.data.largest_train() or float("inf"))

    # ------------------------------------------------------------------ training
    def train(self, server_round: int, selected: list[int], global_arrays: Arrays) -> TrainOutcome:
        drill(f"round-{server_round}:train")
        if self.secagg is None:
            return self._train_plaintext(server_round, selected, global_arrays)
        if len(selected) < max(2, self.secagg.min_cohort):
            need = max(2, self.secagg.min_cohort)
            return TrainOutcome(None, failures=[(n, f"secure aggregation needs {need} nodes") for n in selected])
        return self._train_secure(server_round, selected, global_arrays)

    def _train_plaintext(self, server_round: int, selected: list[int], global_arrays: Arrays) -> TrainOutcome:
        """Each selected node returns h_k and |D_k| (Algorithm 1); the outcome is the average change
        sum_k w_k h_k / sum_k w_k - h_g, as a secure round's is."""
        fitins = FitIns(ndarrays_to_parameters(list(global_arrays.values())), {FIT_ROUND: server_round})
        msgs = [Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in selected]
        outcome = TrainOutcome(None)
        updates, answered = [], set()
        for node, reply in self._exchange(f"round {server_round}: training", msgs):
            answered.add(node)
            update = None if reply.has_error() else plaintext_update(reply, global_arrays, self.max_weight())
            if update is None:
                why = error_reason(reply) if reply.has_error() else "malformed training reply"
                outcome.failures.append((node, why))
                continue
            updates.append(update[:2])
            outcome.contributors.append(node)
            if update[2] is not None:
                outcome.losses.append(update[2])
        outcome.failures += [(n, "no reply before fl.round_timeout") for n in selected if n not in answered]
        outcome.contributors = [n for n in selected if n in set(outcome.contributors)]
        if updates:
            average = robust_average(updates, self.cfg.fl.aggregation, self.cfg.fl.trim_fraction)
            outcome.change = OrderedDict((k, average[k].astype(np.float64) - global_arrays[k]) for k in global_arrays)
        return outcome

    def _train_secure(self, server_round: int, selected: list[int], global_arrays: Arrays) -> TrainOutcome:
        """The coordinator learns only sum_k w_k (h_k - h_g) (see secure_aggregation.py)."""
        task = self.progress.clients(f"round {server_round}: secure aggregation", 1)
        result = secure_fit_round(self.grid, self.context, self.secagg, server_round, selected, global_arrays,
                                  {FIT_ROUND: server_round})
        task.advance()
        task.done()
        if result.aborted:  # each node's own refusal where it sent one
            self.audit.append("secure_round_aborted", round=server_round, reason=result.why)
            return TrainOutcome(None, failures=[(n, result.failures.get(n) or f"round aborted: {result.why}")
                                                for n in selected])
        contributors = [n for n in selected if n in set(result.contributors)]
        failures = [(n, result.failures.get(n, "dropped out of the secure round")) for n in selected
                    if n not in set(contributors)]
        return TrainOutcome(result.average_change, contributors, failures)

    # ------------------------------------------------------------------ evaluation and witnessing
    def _audit_head(self, node: int) -> ConfigRecord:
        """The log's head for `node` to witness, with the digests since the last head it acknowledged."""
        start = self.witnessed.get(node, -1) + 1
        return AuditHead(self.audit.log_id, self.audit.seq - 1, self.audit.head, start,
                         self.audit.digests[start:]).to_record()

    def _acknowledged(self, node: int, reply: Message) -> None:
        ack = WitnessAck.read(reply.content)
        if ack is not None:
            self.witnessed[node] = ack.seq

    def evaluate(self, server_round: int, nodes: list[int], global_arrays: Arrays, next_round: int) -> EvalOutcome:
        """Send the round's aggregate to every node: released accuracies, privacy reports, and each
        node's answer to the offer of `next_round` (0: none). Each message carries the audit head
        for the node to witness."""
        content: Callable[[int], RecordDict] = lambda node: RecordDict({  # noqa: E731
            R.GLOBAL: R.arrays_to_record(global_arrays), AuditHead.KEY: self._audit_head(node),
            RoundOffer.KEY: RoundOffer(server_round, next_round).to_record()})
        msgs = [Message(content(n), dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        drill(f"round-{server_round}:evaluate")
        out, answered = EvalOutcome(), set()
        for node, reply in self._exchange(f"round {server_round}: evaluating", msgs):
            language = self.languages[node]
            answered.add(node)
            if reply.has_error():
                out.declined[language] = f"no answer: {error_reason(reply)}"
                continue
            metrics = reply.content.metric_records.get(R.EVAL)
            report = reply.content.config_records.get(R.PRIVACY)
            try:
                answer = Answer.read(reply.content)
            except Malformed:
                answer = None
            if metrics is None or answer is None:
                out.declined[language] = "malformed evaluation reply"
                continue
            self._acknowledged(node, reply)
            if isinstance(metrics.get("accuracy"), float) and 0.0 <= metrics["accuracy"] <= 1.0:
                out.accuracy[language] = float(metrics["accuracy"])
            if report is not None and len(report):
                out.privacy[language] = dict(report)
            if answer.accept:
                out.willing.append(node)
            elif next_round:
                out.declined[language] = describe(answer.code, "declined without a reason code")
        for node in nodes:
            if node not in answered:
                out.declined[self.languages[node]] = "no answer before fl.round_timeout"
        order = self.cfg.data.languages
        return EvalOutcome({lang: out.accuracy[lang] for lang in order if lang in out.accuracy},
                           {lang: out.privacy[lang] for lang in order if lang in out.privacy}, sorted(out.willing),
                           {lang: out.declined[lang] for lang in order if lang in out.declined})

    def personalize(self, nodes: list[int], final_arrays: Arrays) -> Optional[dict[str, float]]:
        """Each node adapts the final encoder on its own data and keeps the result (node/personal.py);
        the accuracies its rules release come back (None: the experiment does not personalize)."""
        plan = self.cfg.personalization
        if not plan.planned:
            return None
        content = RecordDict({R.GLOBAL: R.arrays_to_record(final_arrays)})
        msgs = [Message(content, dst_node_id=n, message_type=R.PERSONALIZE_QUERY) for n in nodes]
        accuracy = {}
        for node, reply in self._exchange(f"personalizing ({plan.adapt_epochs} local epochs)", msgs):
            metrics = None if reply.has_error() else reply.content.metric_records.get(R.EVAL)
            value = metrics.get("accuracy") if metrics is not None else None
            if isinstance(value, float) and 0.0 <= value <= 1.0:
                accuracy[self.languages[node]] = value
            elif reply.has_error():
                self.audit.append("personalization_failed", client=self.languages[node], reason=error_reason(reply))
        self.audit.append("personalized", accuracy=accuracy)
        return {lang: accuracy[lang] for lang in self.cfg.data.languages if lang in accuracy}

    def witness_end(self, nodes: list[int]) -> None:
        """The final audit head, for every node to witness (the entries after the last evaluation).
        The summary is written by now: Ctrl-C lets this last exchange finish, so the run ends whole."""
        msgs = [Message(RecordDict({AuditHead.KEY: self._audit_head(n)}), dst_node_id=n,
                        message_type=R.WITNESS_QUERY) for n in nodes]
        drill("witness")
        for node, reply in exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout, stoppable=False):
            if not reply.has_error():
                self._acknowledged(node, reply)


def plaintext_update(reply: Message, global_arrays: Arrays, max_weight: float):
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
