"""The message vocabulary both sides agree on: record keys, message types, array codecs.

A round (coordinator/app.py drives it, node/app.py answers):
- `setup` (query): the experiment request, the label space and an identity challenge;
  the node answers with its identity proof and whether it accepts (a refusal code if not);
- training: SecAgg+ stages (secure rounds) or a Flower FitIns (plaintext rounds); a secure
  round carries signed key advertisements and, between collecting the masked vectors and
  unmasking, a consistency exchange of survivor-set signatures (node/secagg.py);
- `evaluate`: the aggregate of the round, the offer of the next round and the audit
  head to witness; the node answers with released metrics, accept/decline for the
  next round and its signed witness record;
- `query.witness` once at the end: the final audit head.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

SETUP = "securefpt-setup"  # ConfigRecord: request (JSON), challenge
IDENTITY = "identity"  # ConfigRecord: client-id, proof (setup reply)
ANSWER = "answer"  # ConfigRecord: accept (bool), code (refusal code or "ok")
GLOBAL = "global"  # ArrayRecord: a global encoder (trainable parameters only)
ROUND = "round"  # ConfigRecord: server-round, next-round (0: none)
EVAL = "eval"  # MetricRecord: metrics the node's rules release
PRIVACY = "privacy"  # ConfigRecord: the privacy report the node's rules release
AUDIT_HEAD = "audit-head"  # ConfigRecord: log-id, seq, head, digests since the node's last witnessed head
WITNESS = "witness"  # ConfigRecord: the node's signed record of the head it witnessed
KEY_ADVERTISEMENT = "securefpt-keyad"  # SecAgg+ setup reply: the node's signed key advertisement
KEY_ADVERTISEMENTS = "securefpt-keyads"  # SecAgg+ share-keys message: the peers' advertisements, by node id
SURVIVORS = "securefpt-survivors"  # consistency message: the survivor set; reply: the node's signature
SURVIVOR_SIGNATURES = "securefpt-survivor-signatures"  # SecAgg+ unmask message: the signatures, by node id

WITNESS_QUERY = "query.witness"
PERSONALIZE_QUERY = "query.personalize"


def as_int(value: object) -> int:
    """A record's value read as an int (a value of another kind: TypeError, a malformed message)."""
    if isinstance(value, (int, float, str)):
        return int(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def as_float(value: object) -> float:
    """A record's value read as a float (a value of another kind: TypeError, a malformed message)."""
    if isinstance(value, (int, float, str)):
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def as_list(value: object) -> list:
    """A record's list value (a scalar: TypeError, a malformed message)."""
    if isinstance(value, list):
        return value
    raise TypeError(f"expected a list, got {type(value).__name__}")


def arrays_to_record(arrays: "Mapping[str, np.ndarray]") -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def record_to_arrays(record: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def encoder_hash(arrays: "Mapping[str, np.ndarray]") -> str:
    """Identifies a global encoder: its names, shapes, dtypes and bytes (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
