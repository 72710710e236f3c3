"""Protobuf's wire format, for messages assembled from pieces already encoded.

The agent and the collector build some messages by joining bytes (verdicts and their score
entries, batches of spooled verdicts, stored verdicts to subscribers): parsing and re-encoding
each piece would cost more than the rest of the work on those paths.
"""

from __future__ import annotations

from typing import Any

__all__ = ["field_tag", "length_delimited", "length_prefix", "varint"]


def varint(n: int) -> bytes:
    """An unsigned integer as a base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# The varints of the lengths most pieces have (longer ones are computed).
_LENGTHS = [varint(n) for n in range(1 << 10)]


def length_prefix(n: int) -> bytes:
    """The varint of a length."""
    return _LENGTHS[n] if n < 1 << 10 else varint(n)


def length_delimited(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field (string, bytes or message): its tag, the body's length, the body."""
    return tag + length_prefix(len(body)) + body


def field_tag(message: Any, name: str) -> bytes:
    """The wire tag of a message type's field: its number and wire type (length-delimited for
    messages, bytes, strings and packed repeated scalars; varint otherwise, as for the fields
    these callers encode)."""
    field = message.DESCRIPTOR.fields_by_name[name]
    delimited = field.type in (field.TYPE_MESSAGE, field.TYPE_BYTES, field.TYPE_STRING) or field.is_packed
    return varint(field.number << 3 | (2 if delimited else 0))
