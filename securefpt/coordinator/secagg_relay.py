"""What the coordinator relays and checks in a secure round, around Flower's SecAgg+ workflow.

`AuthenticatedSecAggPlus` is Flower's `SecAggPlusWorkflow` with one stage added, the
consistency check of the actively secure variant (Bonawitz et al. 2017), between
collecting the masked vectors and unmasking: every survivor signs the survivor set,
and the unmask request carries the signatures. `Relay` is the Grid the workflow talks
through: it carries each node's signed key advertisement from its setup reply to its
peers' share-keys messages and the survivor signatures to the unmask messages, notes
each node's refusal code, and turns a malformed reply into that node dropping out (a
reply the workflow cannot read would otherwise stop the coordinator).
"""

from __future__ import annotations

from typing import Optional, cast

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from securefpt.coordinator.interrupts import check_stop, drill
from securefpt.coordinator.metering import GridProxy
from securefpt.protocol import records as R
from securefpt.protocol.refusals import MESSAGES, parse

MALFORMED_CODE = 4000


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _bytes_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, bytes) for v in value)


class Relay(GridProxy):
    def __init__(self, inner: Grid, shapes: list[tuple[int, ...]], server_round: int = 0) -> None:
        super().__init__(inner)
        self.server_round = server_round
        self.shapes = [(1,), *shapes]  # a masked vector: the weight factor, then each array
        self.errors: dict[int, str] = {}
        self.advertisements: dict[int, str] = {}
        self.signatures: dict[int, str] = {}

    def _outgoing(self, msg: Message) -> str:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            return "consistency" if R.SURVIVORS in msg.content.config_records else ""
        stage = str(configs.get(Key.STAGE))
        if stage == Stage.SHARE_KEYS:
            listed = {int(k) for k in configs if k != Key.STAGE}
            msg.content.config_records[R.KEY_ADVERTISEMENTS] = ConfigRecord(
                {str(n): ad for n, ad in self.advertisements.items() if n in listed})
        elif stage == Stage.UNMASK:
            msg.content.config_records[R.SURVIVOR_SIGNATURES] = ConfigRecord(
                {str(n): s for n, s in self.signatures.items()})
        return stage

    def _well_formed(self, stage: str, reply: Message) -> bool:
        """Whether the workflow can read this reply of `stage`."""
        content = reply.content
        if stage == "consistency":
            record = content.config_records.get(R.SURVIVORS)
            return record is not None and isinstance(record.get("signature"), str)
        configs = content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            return False
        if stage == Stage.SETUP:
            ad = content.config_records.get(R.KEY_ADVERTISEMENT)
            keys = (configs.get(Key.PUBLIC_KEY_1), configs.get(Key.PUBLIC_KEY_2))
            return (all(isinstance(k, bytes) for k in keys)
                    and ad is not None and isinstance(ad.get("json"), str))
        if stage == Stage.SHARE_KEYS:
            dsts, texts = configs.get(Key.DESTINATION_LIST), configs.get(Key.CIPHERTEXT_LIST)
            return _ints(dsts) and _bytes_list(texts) and len(dsts) == len(texts)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            vector = configs.get(Key.MASKED_PARAMETERS)
            if not _bytes_list(vector) or len(vector) != len(self.shapes):
                return False
            try:
                compat.recorddict_to_fitres(content, keep_input=True)
                arrays = [bytes_to_ndarray(b) for b in vector]
            except Exception:  # anything the codec cannot read
                return False
            return all(a.shape == s and np.issubdtype(a.dtype, np.integer) for a, s in zip(arrays, self.shapes))
        if stage == Stage.UNMASK:
            ids, shares = configs.get(Key.NODE_ID_LIST), configs.get(Key.SHARE_LIST)
            return _ints(ids) and _bytes_list(shares) and len(ids) == len(shares)
        return True

    def send_and_receive(self, messages, *, timeout: Optional[float] = None):
        messages = list(messages)
        stages = {m.metadata.dst_node_id: self._outgoing(m) for m in messages}
        for stage in sorted(set(stages.values())):
            drill(f"round-{self.server_round}:{stage}")
        check_stop()  # the operator's Ctrl-C (or a drill's) lands before any of this stage is sent
        by_node = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for reply in self._inner.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                code = parse(reply.error.reason)
                self.errors[node] = f"{code}: {MESSAGES[code]}" if code else "error reply"
            elif node in by_node and not self._well_formed(stages[node], reply):
                self.errors[node] = "malformed reply"
                reply = Message(Error(code=MALFORMED_CODE, reason="malformed reply"), reply_to=by_node[node])
            elif stages.get(node) == Stage.SETUP:
                self.advertisements[node] = str(reply.content.config_records[R.KEY_ADVERTISEMENT]["json"])
            elif stages.get(node) == "consistency":
                self.signatures[node] = str(reply.content.config_records[R.SURVIVORS]["signature"])
            out.append(reply)
        return out


class AuthenticatedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ stages, with the survivors' consistency check before unmasking."""

    def __call__(self, grid: Grid, context) -> None:
        state = WorkflowState()
        for step in (self.setup_stage, self.share_keys_stage, self.forget_silent_at_share_keys,
                     self.collect_masked_vectors_stage, self.consistency_stage, self.unmask_stage):
            if not step(grid, context, state):
                return

    def forget_silent_at_share_keys(self, grid: Grid, context, state: WorkflowState) -> bool:
        """A node that sent no key shares is masked with by nobody (a node pairs its masks only with
        the peers whose shares reached it): it leaves the round as if never sampled. Flower would
        count it dead at unmask and ask the survivors for shares of its key they never received,
        which aborted the whole round for one node lost during setup."""
        silent = state.sampled_node_ids - state.active_node_ids
        if not silent:
            return True
        state.sampled_node_ids = set(state.active_node_ids)
        for node in silent:
            state.nid_to_neighbours.pop(node, None)
        for neighbours in state.nid_to_neighbours.values():
            neighbours -= silent
        return self._check_threshold(state)

    def consistency_stage(self, grid: Grid, context, state: WorkflowState) -> bool:
        """Every survivor signs the survivor set; the Relay hands the signatures to the unmask stage."""
        server_round = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        survivors = sorted(state.active_node_ids)
        msgs = [Message(RecordDict({R.SURVIVORS: ConfigRecord({"survivors": survivors})}), dst_node_id=n,
                        message_type=MessageType.TRAIN, group_id=str(server_round)) for n in survivors]
        grid.send_and_receive(msgs, timeout=self.timeout)
        return True
