"""Just enough of the protobuf wire format to read and write SentencePiece models.

``protobuf`` is not a dependency of llamalab, and a SentencePiece ``tokenizer.model`` is
a small, flat message (``sentencepiece_model.proto``), so a few lines of varint and
length-delimited encoding are cheaper than the package. Only the fields llamalab
touches are named here; every other field is kept as raw bytes so that a model read
and written back loses nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Wire types (protobuf encoding spec).
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5

# ModelProto fields.
MODEL_PIECES, MODEL_TRAINER_SPEC, MODEL_NORMALIZER_SPEC = 1, 2, 3
# ModelProto.SentencePiece fields.
PIECE_TEXT, PIECE_SCORE, PIECE_TYPE = 1, 2, 3
# TrainerSpec fields that decide how a model encodes.
TRAINER_MODEL_TYPE, TRAINER_BYTE_FALLBACK = 3, 35
TRAINER_MODEL_TYPE_UNIGRAM, TRAINER_MODEL_TYPE_BPE = 1, 2
# NormalizerSpec fields.
NORM_NAME, NORM_ADD_DUMMY_PREFIX, NORM_REMOVE_EXTRA_WS, NORM_ESCAPE_WS = 1, 3, 4, 5


@dataclass(frozen=True)
class Field:
    """One field occurrence: its number, wire type and raw value.

    ``value`` is an int for VARINT, and the undecoded bytes for the other wire types.
    """

    number: int
    wire_type: int
    value: int | bytes


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _write_varint(value: int) -> bytes:
    if value < 0:  # negative int32/int64 are sent as 10-byte two's complement
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def parse(data: bytes) -> list[Field]:
    """Split a serialized message into its fields, in order. Raises ValueError if malformed."""
    fields: list[Field] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        value: int | bytes
        if wire_type == VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == FIXED64:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == FIXED32:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire_type == LEN:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise ValueError("truncated field")
        fields.append(Field(number, wire_type, value))
    return fields


def serialize(fields: list[Field]) -> bytes:
    """The inverse of :func:`parse`."""
    out = bytearray()
    for f in fields:
        out += _write_varint(f.number << 3 | f.wire_type)
        if f.wire_type == VARINT:
            assert isinstance(f.value, int)
            out += _write_varint(f.value)
        else:
            assert isinstance(f.value, bytes)
            if f.wire_type == LEN:
                out += _write_varint(len(f.value))
            out += f.value
    return bytes(out)


def varint(number: int, value: int) -> Field:
    return Field(number, VARINT, int(value))


def string(number: int, value: str | bytes) -> Field:
    return Field(number, LEN, value.encode("utf-8") if isinstance(value, str) else value)


def float32(number: int, value: float) -> Field:
    return Field(number, FIXED32, struct.pack("<f", value))


def message(number: int, fields: list[Field]) -> Field:
    return Field(number, LEN, serialize(fields))


def get(fields: list[Field], number: int) -> Field | None:
    """The last occurrence of a singular field (protobuf's last-one-wins rule)."""
    found = None
    for f in fields:
        if f.number == number:
            found = f
    return found


def as_float(f: Field) -> float:
    assert isinstance(f.value, bytes)
    return struct.unpack("<f", f.value)[0]
