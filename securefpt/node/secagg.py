"""Where an update is masked: Flower's SecAgg+ client, made actively secure around it.

`secure_aggregation_mod` wraps Flower's `secaggplus_mod` (the protocol and its
cryptography are Flower's) with the checks of the actively secure variant (Bonawitz et
al. 2017) and the node's own rules; each refusal is a reason code:
- setup: the node must have accepted the experiment and not yet contributed to the
  round; the protocol parameters must meet its rules (a reconstruction threshold above
  2n/3 of the share count, shares and sampled nodes at least its minimum cohort; under
  distributed DP a threshold of at least its noise contributors, since every sum that can
  be unmasked then holds that many noise shares). Its reply carries its key
  advertisement, signed with its attested key;
- share keys: before any key is derived, every peer's advertisement must verify (the
  signature over exactly these keys, run, round and node id; the attestation against
  the node's own trust store; one node per client); no key substitution, no invented peer;
- collect: the update must be finite, its weight in (0, 1], the weighted update inside
  the clipping range (else the quantizer corrupts the sum); the plaintext dataset size
  and metrics are stripped from the masked reply (the weight is inside the masked vector);
- consistency: the node signs the survivor set it is told, once per round;
- unmask: shares leave only when at least `threshold` known peers signed the same
  survivor set, the request's survivors and dropped nodes are disjoint and match that
  set, and the survivors reach the minimum cohort.
Messages that are not part of a SecAgg+ round go straight to the handler.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from typing import Optional, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from securefpt.node.config import Node, this_node
from securefpt.node.state import NodeState
from securefpt.privacy.distributed import Ring
from securefpt.protocol import key_advertisement as ka
from securefpt.protocol import records as R
from securefpt.protocol.attestation import b64, unb64
from securefpt.protocol.mask_prg import use_full_seed_masks
from securefpt.protocol.refusals import NodeRefusal
from securefpt.protocol.request import ExperimentRequest

_LOG = logging.getLogger("securefpt.node")
_MASKING: contextvars.ContextVar[tuple[bool, Optional[Ring]]] = contextvars.ContextVar(
    "securefpt_masking", default=(False, None))


@contextlib.contextmanager
def masked(ring: Optional[Ring] = None):
    """The train handler's reply leaves masked while this holds (the collect stage's masking), on
    `ring`: the round's SecAgg+ parameters from this node's own protocol state."""
    token = _MASKING.set((True, ring))
    try:
        yield
    finally:
        _MASKING.reset(token)


def masking() -> bool:
    """Whether the train handler runs inside this node's SecAgg+ collect stage, so its reply
    leaves masked. The node decides this itself: a coordinator's "secure" flag in a plain
    train message proves nothing, and would otherwise get the update in the clear."""
    return _MASKING.get()[0]


def masking_ring() -> Optional[Ring]:
    """The SecAgg+ parameters the masked reply is quantized with (distributed DP sizes its share on them)."""
    return _MASKING.get()[1]


def _ring(context: Context) -> Optional[Ring]:
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None:  # no setup stage: Flower's client refuses the collect stage itself
        return None
    return Ring(clipping_range=R.as_float(state["clipping_range"]), quantization_range=R.as_int(state["target_range"]),
                modulus_range=R.as_int(state["mod_range"]), threshold=R.as_int(state["threshold"]),
                shares=R.as_int(state["share_num"]), max_weight=R.as_float(state["max_weight"]))
use_full_seed_masks()  # masks from the whole shared secret, not Flower's 32-bit fold of it

ROUND_STATE = "securefpt-secagg"  # this round's verified peers, in the node's Context state


def check_parameters(share_num: int, threshold: int, sample_num: int, min_cohort: int) -> None:
    """The active-security bound and the node's minimum cohort."""
    if not 3 * threshold > 2 * share_num:
        raise NodeRefusal("protocol-parameters", f"threshold {threshold} is not above 2/3 of {share_num} shares")
    if threshold > share_num or share_num > sample_num:
        raise NodeRefusal("protocol-parameters", f"threshold {threshold}, shares {share_num}, sampled {sample_num}")
    if share_num < min_cohort or sample_num < min_cohort:
        raise NodeRefusal("cohort-below-minimum", f"{share_num} shares, {sample_num} sampled, minimum {min_cohort}")


def check_unmask_request(active: list[int], dead: list[int], min_cohort: int) -> None:
    """Refuse an unmask request that could reveal a single node's update."""
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise NodeRefusal("unmask-unsafe", "node listed twice")
    both = set(active) & set(dead)
    if both:
        raise NodeRefusal("unmask-unsafe", f"nodes {sorted(both)} listed as both surviving and dropped")
    if len(active) < min_cohort:
        raise NodeRefusal("cohort-below-minimum", f"{len(active)} survivors, minimum {min_cohort}")


def _round(msg: Message) -> int:
    try:
        return int(msg.metadata.group_id)
    except ValueError:
        raise NodeRefusal("malformed-request", f"group id {msg.metadata.group_id!r} is not a round") from None


def _accepted_round(node: Node, context: Context, server_round: int) -> ExperimentRequest:
    run = NodeState(node.state_dir).run(context.run_id)
    if run.request_json is None:
        raise NodeRefusal("no-setup", f"run {context.run_id}")
    request = ExperimentRequest.from_json(run.request_json)
    if not 1 <= server_round <= request.training.rounds:
        raise NodeRefusal("round-out-of-plan", f"secure round {server_round}")
    if run.done("trained", server_round):
        raise NodeRefusal("round-replayed", f"round {server_round}")
    return request


def _peers(context: Context, server_round: int) -> tuple[dict[int, ka.Peer], int]:
    """The peers verified at this round's share-keys stage, and the round's threshold."""
    record = context.state.config_records.get(ROUND_STATE)
    data = json.loads(str(record["json"])) if record is not None else {}
    if data.get("round") != server_round:
        raise NodeRefusal("unmask-unsafe", f"no verified peers for round {server_round}")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    peers = {int(n): ka.Peer(c, Ed25519PublicKey.from_public_bytes(unb64(k))) for n, (c, k) in data["peers"].items()}
    return peers, int(data["threshold"])


def _setup(node: Node, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    server_round = _round(msg)
    request = _accepted_round(node, context, server_round)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    threshold = R.as_int(configs[Key.THRESHOLD])
    check_parameters(R.as_int(configs[Key.SHARE_NUMBER]), threshold, R.as_int(configs[Key.SAMPLE_NUMBER]),
                     node.rules.min_cohort)
    if request.dp.distributed and threshold < node.rules.dp.min_noise_contributors:
        raise NodeRefusal("protocol-parameters", f"distributed DP: threshold {threshold} is below this node's "
                                                 f"{node.rules.dp.min_noise_contributors} noise contributors")
    reply = secaggplus_mod(msg, context, call_next)
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    reply.content.config_records[R.KEY_ADVERTISEMENT] = ConfigRecord({"json": ka.advertise(
        node.key, node.attestation, context.run_id, server_round, context.node_id,
        cast(bytes, keys[Key.PUBLIC_KEY_1]), cast(bytes, keys[Key.PUBLIC_KEY_2]))})
    return reply


def _share_keys(node: Node, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Verify every advertised key before Flower derives a shared key from any of them."""
    server_round = _round(msg)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    ads = msg.content.config_records.get(R.KEY_ADVERTISEMENTS, ConfigRecord({}))
    peers: dict[int, ka.Peer] = {}
    for key, value in configs.items():
        if key == Key.STAGE:
            continue
        try:
            node_id, (pk1, pk2) = int(key), cast(list, value)
            peers[node_id] = ka.check_advertisement(str(ads.get(key, "")) or None, context.run_id, server_round,
                                                    node_id, pk1, pk2, node.authorities)
        except (ValueError, TypeError) as exc:
            raise NodeRefusal("peer-unauthenticated", str(exc)) from None
    if context.node_id not in peers or peers[context.node_id].client_id != node.client_id:
        raise NodeRefusal("peer-unauthenticated", "this node's own advertisement is missing or not its own")
    if len({p.client_id for p in peers.values()}) != len(peers):
        raise NodeRefusal("peer-unauthenticated", "one client advertised for two nodes")
    state = context.state.config_records.get(RECORD_KEY_STATE)
    threshold = R.as_int(state["threshold"]) if state is not None else 0
    if len(peers) < max(threshold, node.rules.min_cohort):
        raise NodeRefusal("cohort-below-minimum", f"{len(peers)} verified peers")
    from cryptography.hazmat.primitives import serialization

    raw = lambda k: b64(k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))  # noqa: E731
    context.state.config_records[ROUND_STATE] = ConfigRecord({"json": json.dumps({
        "round": server_round, "threshold": threshold,
        "peers": {str(n): [p.client_id, raw(p.public_key)] for n, p in peers.items()}})})
    return secaggplus_mod(msg, context, call_next)


def _checked_handler(context: Context, call_next: ClientAppCallable) -> ClientAppCallable:
    """The train handler, followed by what makes the masked vector safe to sum and mute about |D_k|.

    The coordinator chooses `max_weight` and `clipping_range`; a refusal that depended on the
    node's weight (|D_k| / max_weight above 1) or on its update's size against them would answer
    one bit of |D_k| per round. So the node never refuses on them: it caps its weight at 1 and
    scales its weighted update into the clipping range (its direction kept; Flower's quantizer
    would otherwise clip each coordinate), noting either in its own log only. A non-finite update
    is refused: it would break the sum, and NaN depends on no size the coordinator can choose."""

    def handler(msg: Message, ctxt: Context) -> Message:
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        state = context.state.config_records[RECORD_KEY_STATE]
        clip, max_weight = R.as_float(state["clipping_range"]), R.as_float(state["max_weight"])
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays = parameters_to_ndarrays(fitres.parameters)
        if not all(np.isfinite(a).all() for a in arrays):
            raise NodeRefusal("update-not-finite")
        if not max_weight > 0 or fitres.num_examples <= 0:
            raise NodeRefusal("weight-out-of-range", f"|D_k|={fitres.num_examples}, max_weight={max_weight:g}")
        weight = min(float(fitres.num_examples), max_weight)  # ratio <= 1 whatever |D_k|
        peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
        ratio = weight / max_weight
        room = 0.999 * clip / (ratio * peak) if peak > 0 else 1.0
        if weight == float(fitres.num_examples) and room >= 1.0:
            return reply
        _LOG.info("secagg: weight capped at max_weight (%s) or update scaled by %.4g to fit clipping_range %g",
                  weight != fitres.num_examples, min(room, 1.0), clip)
        fitres.num_examples = int(weight) if float(weight).is_integer() else weight  # type: ignore[assignment]
        if room < 1.0:
            fitres.parameters = ndarrays_to_parameters([a * room for a in arrays])
        reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
        return reply

    return handler


def _collect(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    with masked(_ring(context)):
        reply = secaggplus_mod(msg, context, _checked_handler(context, call_next))
    if not reply.has_error():
        content = reply.content
        content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": 0})
        content.config_records["fitres.metrics"] = ConfigRecord({})
    return reply


def _consistency(node: Node, msg: Message, context: Context) -> Message:
    """Sign the survivor set this node is told, once per round."""
    server_round = _round(msg)
    _peers(context, server_round)  # only after this round's keys were shared with verified peers
    survivors = sorted(int(n) for n in cast(list, msg.content.config_records[R.SURVIVORS]["survivors"]))
    if context.node_id not in survivors:
        raise NodeRefusal("views-inconsistent", "this node is not among the survivors it is told")
    if len(survivors) < node.rules.min_cohort:
        raise NodeRefusal("cohort-below-minimum", f"{len(survivors)} survivors")
    run = NodeState(node.state_dir).run(context.run_id)
    signed = run.signed(server_round)
    if signed is not None and signed != survivors:
        raise NodeRefusal("views-inconsistent", f"round {server_round}: signed {signed}, now told {survivors}")
    run.sign(server_round, survivors)
    signature = ka.sign_survivors(node.key, context.run_id, server_round, survivors)
    return Message(RecordDict({R.SURVIVORS: ConfigRecord({"signature": signature})}), reply_to=msg)


def _unmask(node: Node, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    server_round = _round(msg)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    active = [int(x) for x in cast(list, configs.get(Key.ACTIVE_NODE_ID_LIST, []))]
    dead = [int(x) for x in cast(list, configs.get(Key.DEAD_NODE_ID_LIST, []))]
    check_unmask_request(active, dead, node.rules.min_cohort)
    peers, threshold = _peers(context, server_round)
    run = NodeState(node.state_dir).run(context.run_id)
    survivors = run.signed(server_round)
    if survivors is None:
        raise NodeRefusal("views-inconsistent", "no survivor set was signed for this round")
    if set(active) != set(survivors) & set(peers) or not set(dead) <= set(peers) - set(survivors):
        raise NodeRefusal("views-inconsistent", f"request {active}/{dead} against signed survivors {survivors}")
    signatures = msg.content.config_records.get(R.SURVIVOR_SIGNATURES, ConfigRecord({}))
    agreeing = ka.count_agreeing({int(k): str(v) for k, v in signatures.items()}, peers, context.run_id,
                                 server_round, survivors)
    if agreeing < max(threshold, node.rules.min_cohort):
        raise NodeRefusal("views-inconsistent", f"{agreeing} peers signed the survivor set, {threshold} needed")
    if run.done("unmasked", server_round):
        raise NodeRefusal("round-replayed", f"unmask of round {server_round}")
    run.mark("unmasked", server_round)
    encoder = run.trained_encoder(server_round)
    if encoder is not None:  # from here the sum with this node's update can be unmasked: never again
        NodeState(node.state_dir).record_encoder(encoder)
    return secaggplus_mod(msg, context, call_next)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if R.SURVIVORS in msg.content.config_records:
        return _consistency(this_node(context), msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    node = this_node(context)
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    if stage == Stage.SETUP:
        return _setup(node, msg, context, call_next)
    if stage == Stage.SHARE_KEYS:
        return _share_keys(node, msg, context, call_next)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        return _collect(msg, context, call_next)
    if stage == Stage.UNMASK:
        return _unmask(node, msg, context, call_next)
    raise NodeRefusal("malformed-request", f"unknown SecAgg+ stage {stage!r}")
