"""The Flower ServerApp: Federated Prompt Averaging (Algorithm 1) over the engine's Grid.

One round: select m = max(C*K, 1) clients, send them the global encoder (trainable
parameters only), aggregate the returned encoders weighted by |D_k|, then evaluate
the new global encoder on every client's held-out data.
"""

from __future__ import annotations

import shlex
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

from securefpt.aggregation import select_clients, weighted_average
from securefpt.client_app import GLOBAL_KEY, SETUP_KEY, arrays_to_record
from securefpt.secure_aggregation import SecAggSettings, resolve_settings, secure_fit_round
from securefpt.checkpoint import RunState, load_checkpoint, save_checkpoint
from securefpt.config import ExperimentConfig, load_config
from securefpt.data import label_space
from securefpt.eligibility import participants
from securefpt.errors import FederationError
from securefpt.identity import check_proof, new_challenge
from securefpt.policy import load_policy
from securefpt.metering import MeteredGrid, collect, exchange
from securefpt.modeling import build_model, count_params, get_trainable
from securefpt.progress import RunProgress
from securefpt.results import ClientRecord, RoundRecord, RunRecorder


def privacy_summary(cfg: ExperimentConfig, reports: dict[str, dict]) -> dict:
    """`summary.json` privacy section from the clients' latest reports (null where DP is off)."""
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


def _error_reason(msg: Message) -> str:
    text = str(msg.error.reason).strip().splitlines()
    return text[-1] if text else f"error code {msg.error.code}"


class FederatedPromptAveraging:
    """Runs one federated experiment on a Grid and writes its run directory."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, grid: Grid, context: Context,
                 show_progress: bool = True, on_receive: Optional[Callable[[Message], None]] = None) -> None:
        self.cfg = cfg
        self.context = context
        self.secagg: Optional[SecAggSettings] = None  # sized in run() for the clients that take part
        self.grid = MeteredGrid(grid, on_receive=on_receive)
        self.participants = participants(cfg)  # the residency policy's decisions, before any training
        self.policy = load_policy(cfg.policy) if cfg.policy is not None else None  # as at the start of the run
        self.labels = label_space(cfg.data)
        self.resumed = load_checkpoint(out_dir, cfg)  # a restarted coordinator goes on from here
        self.recorder = RunRecorder(out_dir, cfg, self.labels, resumed=self.resumed.rounds if self.resumed else None)
        self.progress = RunProgress(enabled=show_progress)
        self.rng = np.random.default_rng(cfg.seed)

    # ------------------------------------------------------------------ setup
    def _wait_for_nodes(self, expected: int, timeout: float = 120.0) -> list[int]:
        deadline = time.monotonic() + timeout
        nodes: list[int] = []
        while time.monotonic() < deadline:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= expected:
                return nodes
            time.sleep(0.1)
        if not nodes:
            raise FederationError(f"no client node connected within {timeout:.0f}s")
        return nodes

    def _setup(self, nodes: list[int]) -> dict[int, str]:
        """Hand each node the experiment and an identity challenge; learn which language it serves.

        A node whose identity does not hold (identity.py) is left out, with the reason
        in the audit log; so is a second node for a language already served.
        """
        challenge = new_challenge()
        content = RecordDict({SETUP_KEY: ConfigRecord(
            {"experiment": self.cfg.to_json(), "labels": self.labels, "challenge": challenge})})
        msgs = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        replies = exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout)
        languages: dict[int, str] = {}
        errors: list[str] = []
        self.refused: dict[str, str] = {}  # language -> why its node(s) were refused
        for node, reply in sorted(replies, key=lambda pair: pair[0]):
            if reply.has_error():
                errors.append(_error_reason(reply))
                continue
            identity = reply.content.config_records["identity"]
            language = str(identity["language"])
            why = self._identity_problem(node, identity, challenge)
            if why is None and language in languages.values():
                why = f"language '{language}' is already served by another node"
            if self.policy is not None:
                self.recorder.audit.append("identity", node=node, language=language,
                                           client=str(identity.get("client-id", "")) or None,
                                           accepted=why is None, reason=why or "identity holds")
            if why is not None:
                self.refused[language] = why
                continue
            languages[node] = language
        if not languages:
            raise FederationError("every client failed setup: "
                                  + "; ".join(sorted(set(errors) | set(self.refused.values()))[:3]))
        for reason in errors:
            self.recorder.audit.append("client_failed_setup", reason=reason)
        self.setup_errors = errors
        return languages

    def _identity_problem(self, node: int, identity: ConfigRecord, challenge: str) -> Optional[str]:
        """Why this node may not act for the client registered for its language (None: it may)."""
        if self.policy is None:
            return None  # no residency policy: nothing is attested
        language = str(identity["language"])
        who = self.participants.get(language)
        if who is None:
            return f"language '{language}' is not in this experiment"
        if who.manifest is None:
            return f"no client manifest is registered for language '{language}'"
        return check_proof(who.manifest, str(identity.get("client-id", "")), str(identity.get("proof", "")),
                           self.context.run_id, node, challenge, self.policy.server.require_key_proof)

    def _offer(self, server_round: int, nodes: list[int], languages: dict[int, str]) -> tuple[list[int], dict]:
        """Ask the eligible clients whether they take part in this round (budgets, policy)."""
        content = lambda: RecordDict({"round": ConfigRecord({"server-round": server_round})})  # noqa: E731
        msgs = [Message(content(), dst_node_id=n, message_type="query.offer") for n in nodes]
        replies = exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout)
        willing, declined = [], {}
        for node, reply in replies:
            if reply.has_error():
                declined[languages[node]] = f"no answer: {_error_reason(reply)}"
                continue
            answer = reply.content.config_records["offer"]
            if bool(answer["accept"]):
                willing.append(node)
            else:
                declined[languages[node]] = str(answer["reason"])
        return sorted(willing), declined

    def _recheck_policy(self, server_round: int, eligible: list[int], languages: dict[int, str]) -> list[int]:
        """Decide again before this round (an attestation may have expired since the last)."""
        try:
            now = participants(self.cfg)
        except FederationError as exc:
            now = {}
            reason = str(exc)
        keep = [n for n in eligible if languages[n] in now and now[languages[n]].decision.included]
        for n in eligible:
            if n not in keep:
                why = now[languages[n]].decision.reason if languages[n] in now else reason
                self.recorder.audit.append("eligibility", round=server_round, client=languages[n],
                                           included=False, reason=why)
        return keep

    def _artifact_region(self) -> Optional[str]:
        """Where the final artifact is stored: the server's region, which the policy must allow."""
        if self.policy is None:
            return None
        server = self.policy.server
        if server.region not in server.artifact_regions:
            raise FederationError(f"policy forbids storing the artifact in the server's region '{server.region}'")
        return server.region

    def _in_order(self, langs) -> list[str]:
        chosen = set(langs)
        return [lang for lang in self.cfg.data.languages if lang in chosen]

    # ------------------------------------------------------------------ rounds
    def _train_round(self, server_round: int, selected: list[int], global_arrays) -> tuple:
        """Plaintext round: each selected client returns h_k and |D_k| (Algorithm 1)."""
        parameters = ndarrays_to_parameters(list(global_arrays.values()))
        fitins = FitIns(parameters, {"server-round": server_round})
        msgs = [
            Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in selected
        ]
        task = self.progress.clients(f"round {server_round}: training", len(selected))
        replies = exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout, on_reply=lambda _: task.advance())
        task.done()
        updates, failures, losses = [], [], []
        answered = set()
        names = list(global_arrays)
        for node, reply in replies:
            answered.add(node)
            if reply.has_error():
                failures.append((node, _error_reason(reply)))
                continue
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
            arrays = OrderedDict(zip(names, parameters_to_ndarrays(fitres.parameters), strict=True))
            updates.append((arrays, float(fitres.num_examples)))
            losses.append(float(fitres.metrics["loss"]))
        failures += [(n, "no reply before fl.round_timeout") for n in selected if n not in answered]
        new_global = weighted_average(updates) if updates else None
        return new_global, [n for n in selected if n in answered and n not in dict(failures)], failures, losses

    def _secure_train_round(self, server_round: int, selected: list[int], global_arrays) -> tuple:
        """Secure round: the server learns only sum_k w_k (h_k - h_g) (see secure_aggregation.py)."""
        task = self.progress.clients(f"round {server_round}: secure aggregation", 1)
        outcome = secure_fit_round(self.grid, self.context, self.secagg, server_round, selected, global_arrays,
                                   {"server-round": server_round})
        task.advance()
        task.done()
        contributors = [n for n in selected if n in set(outcome.contributors)]
        failures = [(n, "dropped out of the secure round") for n in selected if n not in set(contributors)]
        if outcome.aborted:
            failures = [(n, "round aborted: too few shares to unmask") for n in selected]
            self.recorder.audit.append("secure_round_aborted", round=server_round)
            return None, [], failures, []
        new_global = OrderedDict(
            (name, (global_arrays[name] + outcome.average_change[name]).astype(np.float32)) for name in global_arrays
        )
        return new_global, contributors, failures, []

    def _evaluate(self, server_round: int, nodes: list[int], global_arrays) -> dict[str, float]:
        msgs = [
            Message(RecordDict({GLOBAL_KEY: arrays_to_record(global_arrays)}), dst_node_id=n,
                    message_type=MessageType.EVALUATE)
            for n in nodes
        ]
        task = self.progress.clients(f"round {server_round}: evaluating", len(nodes))
        replies = collect(self.grid, msgs, timeout=self.cfg.fl.round_timeout, on_reply=lambda _: task.advance())
        task.done()
        accuracy, privacy = {}, {}
        for reply in replies:
            if reply.has_error():
                continue
            language = str(reply.content.config_records["identity"]["language"])
            metrics = reply.content.metric_records["eval"]
            if "accuracy" in metrics:
                accuracy[language] = float(metrics["accuracy"])
            report = reply.content.config_records.get("privacy")
            if report is not None and len(report):
                privacy[language] = dict(report)
        order = self.cfg.data.languages
        return ({lang: accuracy[lang] for lang in order if lang in accuracy},
                {lang: privacy[lang] for lang in order if lang in privacy})

    def _initial_state(self, global_arrays: OrderedDict) -> RunState:
        """A fresh start, or the checkpoint of a run whose coordinator restarted; its
        rounds are the recorder's (one list, which every completed round extends)."""
        if self.resumed is None:
            return RunState(global_arrays=global_arrays, rounds=self.recorder.rounds)
        state = self.resumed
        state.rounds = self.recorder.rounds
        order = list(global_arrays)  # the model's parameter order, which the clients share
        state.global_arrays = OrderedDict((k, state.global_arrays[k]) for k in order)
        if state.best_arrays is not None:
            state.best_arrays = OrderedDict((k, state.best_arrays[k]) for k in order)
        self.rng.bit_generator.state = state.rng_state
        self.progress.console.print(f"resuming after round {state.completed} (checkpoint in {self.recorder.out_dir})")
        return state

    def run(self) -> dict:
        cfg = self.cfg
        audit = self.recorder.audit
        assembled = build_model(cfg.model, cfg.peft, len(self.labels), cfg.seed)
        state = self._initial_state(get_trainable(assembled.model))
        trainable, total = count_params(assembled.model)
        del assembled

        nodes = self._wait_for_nodes(len(cfg.data.languages))
        languages = self._setup(nodes)
        why_missing = "failed setup: " + ("; ".join(sorted(set(self.setup_errors))) or "no reply")
        clients: dict[str, ClientRecord] = {}
        for lang, who in self.participants.items():
            answered = lang in languages.values()
            included = who.decision.included and answered
            missing = f"identity refused: {self.refused[lang]}" if lang in self.refused else why_missing
            reason = who.decision.reason if not who.decision.included else ("eligible" if answered else missing)
            clients[who.client_id] = ClientRecord(region=who.region, language=lang, included=included, reason=reason)
        admitted = {c.language for c in clients.values() if c.included}
        eligible = sorted(n for n, lang in languages.items() if lang in admitted)
        audit.append("eligibility", round=state.completed, clients={k: asdict(v) for k, v in clients.items()})
        if not eligible:
            raise FederationError("no eligible client answered: " + "; ".join(f"{k}: {v.reason}" for k, v in clients.items()))
        if cfg.secagg.enabled:  # the protocol is sized for the clients that actually take part
            self.secagg = resolve_settings(cfg, len(eligible))

        last_round = state.completed if state.stopped else cfg.fl.rounds
        self.progress.start(last_round - state.completed)
        for server_round in range(state.completed + 1, last_round + 1):
            start = time.perf_counter()
            up0, down0 = self.grid.snapshot()
            if cfg.policy is not None and server_round > 1:
                eligible = self._recheck_policy(server_round, eligible, languages)
            willing, declined = self._offer(server_round, eligible, languages)
            for lang, why in declined.items():
                audit.append("declined", round=server_round, client=lang, reason=why)
            if not willing:
                audit.append("no_willing_clients", round=server_round)
                self.progress.console.print(f"round {server_round}: every client declined; stopping")
                break
            selected = select_clients(willing, cfg.fl.fraction_fit, self.rng, population=len(eligible))
            train = self._secure_train_round if self.secagg is not None else self._train_round
            train_start = time.perf_counter()
            if self.secagg is not None and len(selected) < 2:
                new_global, contributors, failures, losses = None, [], [(n, "secure aggregation needs 2 clients")
                                                                       for n in selected], []
            else:
                new_global, contributors, failures, losses = train(server_round, selected, state.global_arrays)
            train_seconds = time.perf_counter() - train_start
            aborted = new_global is None
            if not aborted:
                state.global_arrays = new_global
            state.secure_rounds.append({"round": server_round, "participants": self._in_order(languages[n] for n in contributors),
                                  "dropouts": self._in_order(languages[n] for n, _ in failures), "aborted": aborted})
            accuracy, privacy = self._evaluate(server_round, eligible, state.global_arrays)
            if privacy:
                state.latest_privacy.update(privacy)
                audit.append("privacy", round=server_round,
                             epsilon={lang: p["epsilon"] for lang, p in privacy.items()})
            up1, down1 = self.grid.snapshot()
            record = RoundRecord(
                round=server_round,
                accuracy=accuracy,
                seconds=time.perf_counter() - start,
                train_seconds=train_seconds,
                participants=self._in_order(languages[n] for n in contributors),
                failures=sorted(f"{languages.get(n, n)}: {why}" for n, why in failures),
                train_loss=float(np.mean(losses)) if losses else None,
                bytes_up=up1 - up0,
                bytes_down=down1 - down0,
                aborted=aborted,
                declined=declined,
                epsilon={lang: p["epsilon"] for lang, p in privacy.items()} or None,
            )
            self.recorder.add_round(record)
            self.progress.round_done(record)
            best = state.best_record()
            if best is None or record.avg() > best.avg():
                state.best_round, state.best_arrays, state.stale = server_round, OrderedDict(state.global_arrays), 0
            else:
                state.stale += 1
            state.stopped = cfg.fl.patience is not None and state.stale >= cfg.fl.patience
            state.completed, state.rng_state = server_round, self.rng.bit_generator.state
            save_checkpoint(self.recorder.out_dir, cfg, state)
            if state.stopped:
                audit.append("early_stop", round=server_round, best_round=state.best_round)
                break
        self.progress.stop()

        final_record, final_arrays = self.recorder.rounds[-1], state.global_arrays
        if cfg.fl.patience is not None and state.best_round is not None:
            final_record, final_arrays = state.best_record(), state.best_arrays
        self.recorder.save_artifact(final_arrays, region=self._artifact_region())
        secure = {"enabled": self.secagg is not None}
        if self.secagg is not None:
            secure.update(settings=asdict(self.secagg), rounds=state.secure_rounds,
                          aborted_rounds=[r["round"] for r in state.secure_rounds if r["aborted"]])
        return self.recorder.write_summary(final_record, trainable, total, clients, secure_aggregation=secure,
                                           privacy=privacy_summary(cfg, state.latest_privacy))


def build_server_app(
    cfg: Optional[ExperimentConfig] = None,
    out_dir: Optional[Path] = None,
    show_progress: bool = True,
    on_error: Optional[Callable[[BaseException], None]] = None,
    on_receive: Optional[Callable[[Message], None]] = None,
) -> ServerApp:
    """A ServerApp bound to an experiment, or reading it from the run config (`flwr run`):
    `experiment` (a YAML path), `overrides` ("key=value ..." as `securefpt run --set`), `out-dir`.

    `on_error` receives an exception raised by the run, so an in-process caller can
    re-raise it after the engine has shut down; `on_receive` sees every message the
    server receives (for audits and tests).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            overrides = shlex.split(str(context.run_config.get("overrides", "")))
            run_cfg = cfg or load_config(str(context.run_config["experiment"]), overrides)
            run_out = out_dir or Path(str(context.run_config.get("out-dir", "runs/flwr")))
            FederatedPromptAveraging(run_cfg, run_out, grid, context, show_progress, on_receive).run()
        except BaseException as exc:
            if on_error is None:
                raise
            on_error(exc)

    return app


app = build_server_app()
