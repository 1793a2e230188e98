"""A hostile coordinator's toolbox: a ServerApp that sends whatever it likes, and the SecAgg+
recoveries a malicious coordinator would run with Flower's own cryptography.

Used by tests/test_hostile_coordinator.py and tests/test_malicious_secagg.py. The recoveries
succeed against Flower's honest-but-curious SecAgg+ client (the tests show it, as a control)
and are the same code run against securefpt's nodes.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from typing import Optional

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.common.serde import message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from securefpt.protocol import records as R
from securefpt.protocol.identity import new_challenge
from securefpt.protocol.mask_prg import (
    expand_mask as pseudo_rand_gen,  # the masks' public expansion, as the nodes run it
)
from securefpt.protocol.refusals import parse

CLIP, QRANGE, MOD = 1.0, 2**22, 2**32


class Hostile:
    """Plays a script of attacks on the Grid and keeps every reply (and its bytes)."""

    def __init__(self, grid: Grid, log: dict) -> None:
        self.grid, self.log = grid, log
        self.nodes = sorted(grid.get_node_ids())
        self.who: dict[int, str] = {}

    def send(self, step: str, messages: list[Message]) -> dict[str, Message]:
        replies = {}
        for reply in self.grid.send_and_receive(messages, timeout=120):
            node = reply.metadata.src_node_id
            replies[self.who.get(node, str(node))] = reply
            self.log.setdefault("bytes", []).append((step, self.who.get(node), reply.metadata.message_type,
                                                     message_to_proto(reply).SerializeToString(), records_of(reply)))
        self.log.setdefault("steps", {})[step] = {k: outcome_of(v) for k, v in replies.items()}
        return replies

    def setup(self, step: str, request, to=None) -> dict[str, Message]:
        """Send a setup; the first one also learns which node is which client (from the identities)."""
        text = request if isinstance(request, str) else json.dumps(request)
        content = lambda: RecordDict({R.SETUP: ConfigRecord({"request": text, "challenge": new_challenge()})})  # noqa
        replies = self.send(step, [Message(content(), dst_node_id=n, message_type=MessageType.QUERY)
                                   for n in self.ids(to)])
        if not self.who:
            for reply in replies.values():
                if not reply.has_error() and R.IDENTITY in reply.content.config_records:
                    self.who[reply.metadata.src_node_id] = str(reply.content.config_records[R.IDENTITY]["client-id"])
            self.log["steps"][step] = {self.who.get(r.metadata.src_node_id, k): outcome_of(r)
                                       for k, r in replies.items()}
        return replies

    def train(self, step: str, client: str, server_round: int, arrays, **flags) -> Message:
        fitins = FitIns(ndarrays_to_parameters(list(arrays.values())), {"server-round": server_round, **flags})
        msg = Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=self.ids([client])[0],
                      message_type=MessageType.TRAIN)
        return self.send(step, [msg])[client]

    def evaluate(self, step: str, client: str, server_round: int, arrays, next_round: int = 0) -> Message:
        content = RecordDict({R.GLOBAL: R.arrays_to_record(arrays),
                              R.ROUND: ConfigRecord({"server-round": server_round, "next-round": next_round})})
        msg = Message(content, dst_node_id=self.ids([client])[0], message_type=MessageType.EVALUATE)
        return self.send(step, [msg])[client]

    def personalize(self, step: str, client: str, arrays) -> Message:
        msg = Message(RecordDict({R.GLOBAL: R.arrays_to_record(arrays)}), dst_node_id=self.ids([client])[0],
                      message_type=R.PERSONALIZE_QUERY)
        return self.send(step, [msg])[client]

    def ids(self, clients=None) -> list[int]:
        if clients is None:
            return self.nodes
        return [next(n for n, c in self.who.items() if c == client) for client in clients]


def records_of(msg: Message) -> dict:
    if msg.has_error():
        return {}
    return {f"{kind}.{name}": dict(rec) for kind in ("config_records", "metric_records")
            for name, rec in getattr(msg.content, kind).items()}


def outcome_of(msg: Message):
    """A refusal code (setup answers and errors), 'ok', or the metrics of an evaluation."""
    if msg.has_error():
        return parse(msg.error.reason) or f"unstructured: {msg.error.reason}"
    answer = msg.content.config_records.get(R.ANSWER)
    if answer is not None and msg.metadata.message_type == MessageType.QUERY:
        return str(answer["code"])
    if msg.metadata.message_type == MessageType.EVALUATE:
        return {"metrics": dict(msg.content.metric_records[R.EVAL]), "code": str(answer["code"])}
    return "ok"


def hostile_app(script, log: dict, nodes: int) -> ServerApp:
    """A ServerApp that waits for `nodes` nodes and runs `script(Hostile)`; failures land in log['error']."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < nodes:
            time.sleep(0.1)
        try:
            script(Hostile(grid, log))
        except BaseException:  # the test reports it
            log["error"] = traceback.format_exc()

    return app


def node_app_with(mod) -> ClientApp:
    """The node's own ClientApp (its handlers, hygiene and fault mods) with `mod` in the place of its
    innermost mod: a misbehaving node, or a planted bug, around the real handlers."""
    from securefpt.node import app as node_app
    from securefpt.node.guards import fault_injection_mod, hygiene_mod

    app = ClientApp(mods=[hygiene_mod, fault_injection_mod, mod])
    app.query()(node_app.setup)
    app.train()(node_app.train)
    app.evaluate()(node_app.evaluate)
    app.query("witness")(node_app.witness_head)
    return app


def call_node(handler, node_yaml, run_id: int, content: RecordDict, message_type: str, group_id: str = "0",
              state: Optional[RecordDict] = None) -> Message:
    """Deliver one message straight to a node's handler (or mod), in run `run_id`, as a coordinator
    would: no engine in between, so a probe costs milliseconds."""
    from flwr.app import Metadata

    msg = Message(content=content, metadata=Metadata(
        run_id=run_id, message_id=f"m{run_id}-{time.time_ns()}", src_node_id=1, dst_node_id=7,
        reply_to_message_id="", group_id=group_id, created_at=time.time(), ttl=60.0, message_type=message_type))
    context = Context(run_id=run_id, node_id=7, node_config={"config": str(node_yaml)},
                      state=state if state is not None else RecordDict(), run_config={})
    return handler(msg, context)


def setup_content(request) -> RecordDict:
    text = request if isinstance(request, str) else json.dumps(request)
    return RecordDict({R.SETUP: ConfigRecord({"request": text, "challenge": new_challenge()})})


# ---------------------------------------------------------------- SecAgg+ by a malicious coordinator


def key_pairs() -> tuple[bytes, bytes, bytes, bytes]:
    """(sk1, pk1, sk2, pk2) of a peer whose secrets the coordinator holds."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    return private_key_to_bytes(sk1), public_key_to_bytes(pk1), private_key_to_bytes(sk2), public_key_to_bytes(pk2)


def stage_message(node: int, server_round: int, configs: dict, extra: Optional[dict] = None,
                  fitins: Optional[FitIns] = None) -> Message:
    content = compat.fitins_to_recorddict(fitins, True) if fitins is not None else RecordDict()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
    for name, record in (extra or {}).items():
        content.config_records[name] = record
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))


def setup_configs(sample: int, shares: int, threshold: int, max_weight: float) -> dict:
    return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sample, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: CLIP, Key.TARGET_RANGE: QRANGE, Key.MOD_RANGE: MOD, Key.MAX_WEIGHT: max_weight}


def fitins(encoder: dict, server_round: int) -> FitIns:
    return FitIns(ndarrays_to_parameters(list(encoder.values())), {"server-round": server_round, "secure": True})


def unmask_alone(masked: list, b_seed: bytes, pairwise: dict[int, bytes], target: int,
                 max_weight: float) -> tuple[list, float]:
    """One node's update and weight from its masked vector, its self-mask seed and its pairwise
    mask keys (by peer): what a coordinator gets when it holds both kinds of a node's secrets."""
    shapes = [a.shape for a in masked]
    vector = [np.asarray(a, dtype=np.int64) - m for a, m in zip(masked, pseudo_rand_gen(b_seed, MOD, shapes))]
    for peer, shared in pairwise.items():
        mask = pseudo_rand_gen(shared, MOD, shapes)
        vector = [v - m if target > peer else v + m for v, m in zip(vector, mask)]
    q_ratio, rest = factor_extract(parameters_mod(vector, MOD))
    weight = int(q_ratio) / QRANGE
    change = [a * (QRANGE / int(q_ratio)) for a in dequantize(rest, CLIP, QRANGE)]
    return change, weight * max_weight


def shared_key(secret: bytes, public: bytes) -> bytes:
    return generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public))


def invented_peers(h: Hostile, step: str, target: str, server_round: int, encoder: dict, max_weight: float,
                   peers: Optional[list[str]] = None) -> dict:
    """Run SecAgg+ with `target` and three peers whose keys the coordinator holds: invented node ids
    or, with `peers`, real nodes whose advertised keys it substitutes with its own (relaying their
    real signed advertisements). Threshold 3 of 4 meets the active-security bound, so only the
    peers' authentication stands in the way. Returns the refusal or the recovered update."""
    t = h.ids([target])[0]
    real = h.ids(peers) if peers else []
    fake_ids = real or [2**40 + i for i in range(3)]
    keys = {f: key_pairs() for f in fake_ids}
    cfg = setup_configs(4, 4, 3, max_weight)
    ads = {}
    for node in [t, *real]:  # real peers advertise their real keys (which the coordinator then swaps)
        reply = h.send(f"{step}: setup", [stage_message(node, server_round, cfg)])
        reply = next(iter(reply.values()))
        if reply.has_error():
            return {"refusal": parse(reply.error.reason)}
        ad = reply.content.config_records.get(R.KEY_ADVERTISEMENT)
        ads[node] = ad["json"] if ad is not None else ""
        if node == t:
            pk1_t, pk2_t = (reply.content.config_records[RECORD_KEY_CONFIGS][k] for k in (Key.PUBLIC_KEY_1,
                                                                                         Key.PUBLIC_KEY_2))
    share = {Key.STAGE: Stage.SHARE_KEYS, str(t): [pk1_t, pk2_t],
             **{str(f): [keys[f][1], keys[f][3]] for f in fake_ids}}
    relayed = ConfigRecord({str(n): ad for n, ad in ads.items() if ad})
    reply = next(iter(h.send(f"{step}: share keys", [stage_message(t, server_round, share,
                                                                   {R.KEY_ADVERTISEMENTS: relayed})]).values()))
    if reply.has_error():
        return {"refusal": parse(reply.error.reason)}
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    b_shares, sk_shares = [], []
    for dst, ciphertext in zip(configs[Key.DESTINATION_LIST], configs[Key.CIPHERTEXT_LIST]):
        shared = generate_shared_key(bytes_to_private_key(keys[dst][2]), bytes_to_public_key(pk2_t))
        _, _, b_share, sk_share = share_keys_plaintext_separate(decrypt(shared, ciphertext))
        b_shares.append(b_share)
        sk_shares.append(sk_share)
    forwarded = []
    for f in fake_ids:  # the peers' (meaningless) shares for the target, so that it goes on
        shared = generate_shared_key(bytes_to_private_key(keys[f][2]), bytes_to_public_key(pk2_t))
        forwarded.append(encrypt(shared, share_keys_plaintext_concat(f, t, os.urandom(24), os.urandom(24))))
    collect = {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: forwarded, Key.SOURCE_LIST: fake_ids}
    reply = next(iter(h.send(f"{step}: collect", [stage_message(t, server_round, collect,
                                                                fitins=fitins(encoder, server_round))]).values()))
    if reply.has_error():
        return {"refusal": parse(reply.error.reason)}
    masked = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    sk1_t = combine_shares(sk_shares)
    change, weight = unmask_alone(masked, combine_shares(b_shares),
                                  {f: shared_key(sk1_t, keys[f][1]) for f in fake_ids}, t, max_weight)
    return {"refusal": None, "change": change, "weight": weight}


def lie_at_unmask(h: Hostile, step: str, target: str, server_round: int, encoder: dict, max_weight: float,
                  threshold: int, lie: str) -> dict:
    """An honest SecAgg+ round among all nodes until the unmask stage, where the coordinator lies
    about who survived so that it collects both kinds of the target's secrets:
    - `split`: half of the target's peers are told it survived (they reveal its self-mask seed),
      the other half that it dropped (they reveal its pairwise-mask key);
    - `alone`: every peer is told that only the target survived (they would reveal its self-mask
      seed, and each other's pairwise-mask keys, from which the target's pairwise masks follow;
      Flower's client refuses a survivor set below its threshold, securefpt's below its minimum).
    Each peer is shown, at the consistency stage, the survivor set meant for it.
    Returns the refusals, or the target's recovered update and |D_k|."""
    nodes, t = h.ids(), h.ids([target])[0]
    n = len(nodes)
    answers = h.send(f"{step}: setup", [stage_message(x, server_round, setup_configs(n, n, threshold, max_weight))
                                        for x in nodes])
    if any(r.has_error() for r in answers.values()):
        return {"refusal": {k: parse(r.error.reason) for k, r in answers.items() if r.has_error()}}
    pks = {r.metadata.src_node_id: [r.content.config_records[RECORD_KEY_CONFIGS][k]
                                    for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)] for r in answers.values()}
    ads = ConfigRecord({str(r.metadata.src_node_id): r.content.config_records[R.KEY_ADVERTISEMENT]["json"]
                        for r in answers.values() if R.KEY_ADVERTISEMENT in r.content.config_records})
    share = {Key.STAGE: Stage.SHARE_KEYS, **{str(x): pks[x] for x in nodes}}
    replies = h.send(f"{step}: share keys", [stage_message(x, server_round, share, {R.KEY_ADVERTISEMENTS: ads})
                                             for x in nodes])
    inbox: dict[int, tuple[list, list]] = {x: ([], []) for x in nodes}
    for reply in replies.values():
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        for dst, ciphertext in zip(configs[Key.DESTINATION_LIST], configs[Key.CIPHERTEXT_LIST]):
            inbox[dst][0].append(ciphertext)
            inbox[dst][1].append(reply.metadata.src_node_id)
    collect = lambda x: {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: inbox[x][0],  # noqa: E731
                         Key.SOURCE_LIST: inbox[x][1]}
    replies = h.send(f"{step}: collect", [stage_message(x, server_round, collect(x),
                                                        fitins=fitins(encoder, server_round)) for x in nodes])
    masked = [bytes_to_ndarray(b) for b in
              next(r for r in replies.values() if r.metadata.src_node_id == t)
              .content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    others = [x for x in nodes if x != t]
    if lie == "split":
        half = len(others) // 2
        told = {x: (sorted(nodes), []) for x in others[:half]} | {x: (others, [t]) for x in others[half:2 * half]}
    else:
        told = {x: ([t], others) for x in others}
    views = {x: active for x, (active, _) in told.items()}
    signatures = {}
    survivors = h.send(f"{step}: consistency", [Message(RecordDict({R.SURVIVORS: ConfigRecord({"survivors": v})}),
                                                        dst_node_id=x, message_type=MessageType.TRAIN,
                                                        group_id=str(server_round)) for x, v in views.items()])
    for reply in survivors.values():
        if not reply.has_error():
            signatures[reply.metadata.src_node_id] = reply.content.config_records[R.SURVIVORS]["signature"]
    msgs = [stage_message(x, server_round, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                                            Key.DEAD_NODE_ID_LIST: dead},
                          {R.SURVIVOR_SIGNATURES: ConfigRecord({str(y): s for y, s in signatures.items()
                                                                if views[y] == active})})
            for x, (active, dead) in told.items()]
    shares: dict[int, list] = {x: [] for x in nodes}
    b_shares, refusals = [], {}
    for reply in h.send(f"{step}: unmask", msgs).values():
        if reply.has_error():
            refusals[reply.metadata.src_node_id] = parse(reply.error.reason)
            continue
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        active = told[reply.metadata.src_node_id][0]
        for owner, share in zip(configs[Key.NODE_ID_LIST], configs[Key.SHARE_LIST]):
            (b_shares if owner == t and t in active else shares[owner]).append(share)
    # the target's pairwise masks: from its own key (split) or from each peer's (alone)
    holders = [t] if lie == "split" else others
    if len(b_shares) < threshold or any(len(shares[x]) < threshold for x in holders):
        return {"refusal": refusals, "shares": (len(b_shares), min(len(shares[x]) for x in holders))}
    if lie == "split":
        sk1_t = combine_shares(shares[t])
        pairwise = {x: shared_key(sk1_t, pks[x][0]) for x in others}
    else:
        pairwise = {x: shared_key(combine_shares(shares[x]), pks[t][0]) for x in others}
    change, weight = unmask_alone(masked, combine_shares(b_shares), pairwise, t, max_weight)
    return {"refusal": refusals, "change": change, "weight": weight}
