"""The records securefpt's own messages carry, one typed class each, written and read here only.

Every key a record holds is named once, in its class (Flower's SecAgg+ stages keep theirs in
`secaggplus_constants`; node/secagg.py adds the signed key advertisements and survivor sets).
`from_record` raises `Malformed` for a record that is missing or does not parse: the receiving
side refuses the message (a node) or counts the reply as a dropout (the coordinator).

    setup (query)          coordinator -> node   SetupOffer
                           node -> coordinator   Identity, Answer
    train                  coordinator -> node   FitIns (its config's FIT_ROUND), SecAgg+'s stages
    evaluate               coordinator -> node   GLOBAL arrays, RoundOffer, AuditHead
                           node -> coordinator   EVAL metrics, Answer, PRIVACY report, WitnessAck
    query.witness          coordinator -> node   AuditHead;   node -> coordinator   WitnessAck
    query.personalize      coordinator -> node   GLOBAL arrays; node -> coordinator EVAL metrics
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flwr.app import ConfigRecord, RecordDict

from securefpt.protocol import records as R

FIT_ROUND = "server-round"  # a training message's FitIns config: the round it belongs to


class Malformed(ValueError):
    """A record that is missing or does not parse."""


def _record(content: RecordDict, key: str) -> ConfigRecord:
    record = content.config_records.get(key)
    if record is None:
        raise Malformed(f"no '{key}' record")
    return record


def _field(record: ConfigRecord, key: str):
    if key not in record:
        raise Malformed(f"no '{key}' in the record")
    return record[key]


@dataclass(frozen=True)
class SetupOffer:
    """The experiment request (JSON; protocol/request.py) and the identity challenge to answer."""

    KEY = R.SETUP
    request: str
    challenge: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"request": self.request, "challenge": self.challenge})

    @classmethod
    def read(cls, content: RecordDict) -> SetupOffer:
        record = _record(content, cls.KEY)
        return cls(str(_field(record, "request")), str(_field(record, "challenge")))


@dataclass(frozen=True)
class Identity:
    """Who answers setup: its client id, its language (trusted only without a policy) and its proof."""

    KEY = R.IDENTITY
    client_id: str
    language: Optional[str]
    proof: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"client-id": self.client_id, "language": self.language or "", "proof": self.proof})

    @classmethod
    def read(cls, content: RecordDict) -> Identity:
        record = _record(content, cls.KEY)
        return cls(str(record.get("client-id", "")), str(record.get("language", "")) or None,
                   str(record.get("proof", "")))


@dataclass(frozen=True)
class Answer:
    """Whether the node takes part (setup) or will train the offered round (evaluate), and its code."""

    KEY = R.ANSWER
    accept: bool
    code: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"accept": self.accept, "code": self.code})

    @classmethod
    def read(cls, content: RecordDict) -> Answer:
        record = _record(content, cls.KEY)
        return cls(bool(_field(record, "accept")), str(record.get("code", "")))


@dataclass(frozen=True)
class RoundOffer:
    """The round whose aggregate an evaluate message carries, and the round it offers (0: none)."""

    KEY = R.ROUND
    server_round: int
    next_round: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"server-round": self.server_round, "next-round": self.next_round})

    @classmethod
    def read(cls, content: RecordDict) -> RoundOffer:
        record = _record(content, cls.KEY)
        try:
            return cls(R.as_int(_field(record, "server-round")), R.as_int(_field(record, "next-round")))
        except (TypeError, ValueError) as exc:
            raise Malformed(str(exc)) from None


@dataclass(frozen=True)
class AuditHead:
    """The audit log's head for a node to witness, with the entry digests since the last it acknowledged."""

    KEY = R.AUDIT_HEAD
    log_id: str
    seq: int
    head: str
    from_seq: int
    digests: list[str]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"log-id": self.log_id, "seq": self.seq, "head": self.head, "from-seq": self.from_seq,
                             "digests": list(self.digests)})

    @classmethod
    def read(cls, content: RecordDict) -> Optional[AuditHead]:
        """None where the message carries no head to witness."""
        record = content.config_records.get(cls.KEY)
        if record is None:
            return None
        try:
            return cls(str(_field(record, "log-id")), R.as_int(_field(record, "seq")), str(_field(record, "head")),
                       R.as_int(_field(record, "from-seq")), [str(d) for d in R.as_list(_field(record, "digests"))])
        except (TypeError, ValueError) as exc:
            raise Malformed(str(exc)) from None


@dataclass(frozen=True)
class WitnessAck:
    """The sequence number of the head the node witnessed (its signed record stays on the node)."""

    KEY = R.WITNESS
    seq: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"seq": self.seq})

    @classmethod
    def read(cls, content: RecordDict) -> Optional[WitnessAck]:
        """None where the reply acknowledges no head (or not as a number)."""
        record = content.config_records.get(cls.KEY)
        seq = record.get("seq") if record is not None else None
        return cls(seq) if isinstance(seq, int) and not isinstance(seq, bool) else None
