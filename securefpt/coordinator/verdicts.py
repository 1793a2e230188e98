"""A node's answer in words, for the audit log and the summary: its refusal code and fixed message."""

from __future__ import annotations

from typing import Optional

from flwr.app import Message

from securefpt.protocol.refusals import MESSAGES, parse


def describe(code: Optional[str], fallback: str) -> str:
    """`code: message` for a known refusal code, else `fallback`."""
    return f"{code}: {MESSAGES[code]}" if code in MESSAGES else fallback


def error_reason(msg: Message) -> str:
    """Why an error reply failed: the node's refusal, or Flower's error code."""
    return describe(parse(msg.error.reason), f"error code {msg.error.code}")
