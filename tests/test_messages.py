"""securefpt's own message records (protocol/messages.py): each written and read by one class, and a
record that is missing a key or holds the wrong kind of value is Malformed, never half-read."""

import pytest
from flwr.app import ConfigRecord, RecordDict

from securefpt.protocol.messages import Answer, AuditHead, Identity, Malformed, RoundOffer, SetupOffer, WitnessAck

MESSAGES = [SetupOffer('{"name": "x"}', "c" * 64), Identity("eng-univ", "eng", "proof"), Answer(False, "budget"),
            RoundOffer(3, 4), AuditHead("a" * 64, 5, "b" * 64, 2, ["d" * 64] * 4), WitnessAck(5)]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_each_record_reads_back_as_written(message):
    assert type(message).read(RecordDict({message.KEY: message.to_record()})) == message


@pytest.mark.parametrize("cls,record", [
    (SetupOffer, {"request": "{}"}),  # no challenge
    (Answer, {"code": "ok"}),  # no accept
    (RoundOffer, {"server-round": 1}),  # no next round
    (RoundOffer, {"server-round": [1, 2], "next-round": 3}),  # a list where a number belongs
    (AuditHead, {"log-id": "a", "seq": 1, "head": "b", "from-seq": 0, "digests": "not-a-list"}),
])
def test_a_record_missing_a_key_or_of_the_wrong_kind_is_malformed(cls, record):
    with pytest.raises(Malformed):
        cls.read(RecordDict({cls.KEY: ConfigRecord(record)}))


def test_a_missing_record_is_malformed_where_required_and_none_where_optional():
    with pytest.raises(Malformed):
        Answer.read(RecordDict({}))
    assert AuditHead.read(RecordDict({})) is None  # a message without a head to witness
    assert WitnessAck.read(RecordDict({WitnessAck.KEY: ConfigRecord({"seq": True})})) is None  # not a number
