"""Bytes to fuzz a gRPC server with: random, truncated, bit-flipped and mis-encoded protobuf messages, and
messages whose fields hold extreme values.

`MessageFuzzer(rng, message_class).case()` draws one FuzzCase: its kind, its bytes, and whether they
decode as that message type (asked of the same protobuf parser the servers use, so a test knows which
answer to expect). Everything comes from the given random.Random: a seed reproduces a run.

Extreme values are the limits of each field's type (2^32 - 1 in a uint32, 2^63 in a uint64, negative
int32s, NaN and infinities in floats), odd Unicode in strings, and repeated fields of thousands of
entries. About half of the values drawn are ordinary small ones instead, so that some messages are
valid requests and exercise the servers beyond their argument checks.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_START_GROUP, WIRE_END_GROUP, WIRE_I32 = 0, 1, 2, 3, 4, 5
MAX_FIELD_NUMBER = 2**29 - 1

# What both servers' fuzz tests share: the standard services' methods, a truncated message, the
# per-call deadline, and how many cases from which seed (the environment can change both).
CHECK, WATCH = "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
TRUNCATED = b"\x0a\x05ab"                   # field 1 says 5 bytes follow; 2 do
DEADLINE_S = 10.0
CASES = int(os.environ.get("PAGEDSERVE_FUZZ_CASES", "5000"))
SEED = int(os.environ.get("PAGEDSERVE_FUZZ_SEED", "17"))
_F = FieldDescriptor
_EXTREMES: dict[int, tuple[int | float, ...]] = {
    _F.CPPTYPE_INT32: (0, 1, -1, -(2**31), 2**31 - 1),
    _F.CPPTYPE_INT64: (0, 1, -1, -(2**63), 2**63 - 1),
    _F.CPPTYPE_UINT32: (0, 1, 2**31, 2**32 - 1),
    _F.CPPTYPE_UINT64: (0, 1, 2**63 - 1, 2**63, 2**64 - 1),
    _F.CPPTYPE_FLOAT: (math.nan, math.inf, -math.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45),
    _F.CPPTYPE_DOUBLE: (math.nan, math.inf, -math.inf, -0.0, 1.7e308, 5e-324),
}
ODD_STRINGS = (
    "", "\x00", "\x00" * 64, "\u202egnirts\u202c", "\ufeffbom", "\ufffe\uffff", "\U0010ffff" * 8,
    "e" + "\u0301" * 2000, "\U0001f9d1\u200d\U0001f52c" * 40, "\U0001d518\U0001d52b\U0001d526",
    "\r\n\t\x0b\x0c",
    "\x1b[31mred\x1b[0m", "%s%n{0}{{}}\\", "../../../../etc/passwd", "' OR 1=1 --", "a" * 100_000,
    "\u0000\u0085\u2028\u2029", "\ud7ff\ue000", "Ω≈ç√∫", "ﷺ" * 300, "\u200b" * 500,
)


def varint(value: int) -> bytes:
    """`value` as a protobuf varint; a negative one as its 64-bit two's complement, as int32/int64 are."""
    if value < 0:
        value &= 2**64 - 1
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def key(field: int, wire_type: int) -> bytes:
    """A field's key: its number and wire type."""
    return varint(field << 3 | wire_type)


def length_delimited(field: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes, a message or a packed repeated field)."""
    return key(field, WIRE_LEN) + varint(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class FuzzCase:
    """One request's bytes; `decodes` says whether protobuf parses them as the message type."""

    kind: str
    data: bytes
    decodes: bool


def odd_string(rng: random.Random) -> str:
    """A string from ODD_STRINGS, or random code points from every plane (surrogates left out)."""
    if rng.random() < 0.6:
        return rng.choice(ODD_STRINGS)
    points = [rng.choice((rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800),
                          rng.randrange(0xE000, 0x110000))) for _ in range(rng.randrange(1, 40))]
    return "".join(map(chr, points))


class MessageFuzzer:
    """Draws fuzz cases for one message type.

    `max_repeated` bounds the entries of all repeated fields of one message together (a string counts
    one per 100 characters), which keeps messages within the servers' size limits; `tune(message, rng)`
    may adjust each extreme message, to make more of them valid.
    """

    def __init__(self, rng: random.Random, message_class: type[Message], max_repeated: int = 20_000,
                 tune: Callable[[Message, random.Random], None] | None = None) -> None:
        self.rng = rng
        self.message_class = message_class
        self.max_repeated = max_repeated
        self.tune = tune
        self._budget = 0                # repeated entries the message being filled may still have
        self._kinds: list[tuple[str, Callable[[], bytes]]] = [
            ("extreme", self.extreme), ("random", self.random_bytes), ("truncated", self.truncated),
            ("bit_flips", self.bit_flips), ("wrong_wire_type", self.wrong_wire_type),
            ("huge_varint", self.huge_varint), ("bad_length", self.bad_length), ("bad_utf8", self.bad_utf8),
            ("unknown_fields", self.unknown_fields), ("deep_groups", self.deep_groups),
            ("concatenated", self.concatenated), ("empty", lambda: b""),
        ]
        self._weights = [30, 10, 10, 10, 8, 8, 5, 5, 6, 3, 4, 1]

    def case(self) -> FuzzCase:
        """One case of a kind drawn by weight."""
        kind, make = self.rng.choices(self._kinds, self._weights)[0]
        data = make()
        return FuzzCase(kind, data, self.decodes(data))

    def decodes(self, data: bytes) -> bool:
        """Whether `data` parses as the message type."""
        try:
            self.message_class.FromString(data)
        except Exception:
            return False
        return True

    # ---- whole messages ----

    def extreme_message(self) -> Message:
        """A message whose fields hold extreme or ordinary values (see the module docstring)."""
        message = self.message_class()
        self._budget = self.max_repeated
        self._fill(message, depth=0)
        if self.tune is not None:
            self.tune(message, self.rng)
        return message

    def extreme(self) -> bytes:
        """An extreme message's bytes."""
        return self.extreme_message().SerializeToString()

    def _fill(self, message: Message, depth: int) -> None:
        density = self.rng.uniform(0.2, 0.9)
        for field in message.DESCRIPTOR.fields:
            if self.rng.random() < density:
                self._set(message, field, depth)

    def _set(self, message: Message, field: FieldDescriptor, depth: int) -> None:
        if field.cpp_type == _F.CPPTYPE_MESSAGE:
            if depth >= 3:
                return
            if field.is_repeated:
                for _ in range(self._count(small=True)):
                    self._fill(getattr(message, field.name).add(), depth + 1)
            else:
                sub = getattr(message, field.name)
                sub.SetInParent()
                self._fill(sub, depth + 1)
        elif field.is_repeated:
            values = [self._value(field) for _ in range(self._count())]
            if field.cpp_type == _F.CPPTYPE_STRING:
                values = self._affordable(values)
            getattr(message, field.name).extend(values)
        else:
            setattr(message, field.name, self._value(field))

    def _count(self, small: bool = False) -> int:
        """How many entries a repeated field gets; `small` for messages, whose entries hold fields."""
        roll = self.rng.random()
        if roll < 0.85 or (small and roll < 0.95):
            count = self.rng.randrange(0, 5)
        elif roll < 0.97 or small:
            count = self.rng.randrange(5, 300)
        else:
            count = self.rng.randrange(1000, self.max_repeated + 1)
        count = max(0, min(count, self._budget))
        self._budget -= count
        return count

    def _affordable(self, strings: list[str]) -> list[str]:
        """The leading strings the budget pays for, at one entry per 100 characters."""
        kept = []
        for text in strings:
            cost = len(text) // 100
            if cost > self._budget:
                break
            self._budget -= cost
            kept.append(text)
        return kept

    def _value(self, field: FieldDescriptor) -> object:
        cpp = field.cpp_type
        if cpp == _F.CPPTYPE_STRING:
            if field.type == _F.TYPE_BYTES:
                return self.rng.randbytes(self.rng.randrange(0, 64))
            return odd_string(self.rng) if self.rng.random() < 0.5 else f"r{self.rng.randrange(1000)}"
        if cpp == _F.CPPTYPE_BOOL:
            return self.rng.random() < 0.5
        if cpp == _F.CPPTYPE_ENUM:
            numbers = [v.number for v in field.enum_type.values]
            return self.rng.choice([*numbers, 2**31 - 1, -1])     # proto3 enums are open
        ordinary = self.rng.random() < 0.5
        if cpp in (_F.CPPTYPE_FLOAT, _F.CPPTYPE_DOUBLE):
            return self.rng.uniform(0.0, 2.0) if ordinary else self.rng.choice(_EXTREMES[cpp])
        return self.rng.randrange(0, 64) if ordinary else self.rng.choice(_EXTREMES[cpp])

    def _base(self) -> bytes:
        return self.extreme() or self.extreme()     # a second try when the first had no field set

    # ---- byte-level damage ----

    def random_bytes(self) -> bytes:
        """Random bytes, mostly short."""
        return self.rng.randbytes(self.rng.choice((self.rng.randrange(1, 16), self.rng.randrange(16, 256),
                                                   self.rng.randrange(256, 8192))))

    def truncated(self) -> bytes:
        """A message cut short (at a field boundary it still decodes, as a shorter message)."""
        data = self._base()
        return data[:self.rng.randrange(0, len(data))] if data else b"\x0a"

    def bit_flips(self) -> bytes:
        """A message with one to eight bits flipped."""
        data = bytearray(self._base() or b"\x00")
        for _ in range(self.rng.randrange(1, 9)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def _known_field(self) -> tuple[int, int]:
        """A field of the type: its number and wire type (field 1 of a type with no fields, as varint)."""
        fields = self.message_class.DESCRIPTOR.fields
        if not fields:
            return 1, WIRE_VARINT
        field = self.rng.choice(fields)
        return field.number, _wire_type(field)

    def wrong_wire_type(self) -> bytes:
        """A known field sent with another wire type, at the end of a message.

        A valid wire type (0, 1, 2, 5, or a closed group) makes protobuf keep it as an unknown field;
        6, 7, a lone end-group or an unclosed group do not decode.
        """
        number, right = self._known_field()
        wire_type = self.rng.choice([w for w in range(8) if w != right])
        payload = {WIRE_VARINT: varint(self.rng.randrange(2**64)), WIRE_I64: self.rng.randbytes(8),
                   WIRE_LEN: varint(3) + b"abc", WIRE_I32: self.rng.randbytes(4),
                   WIRE_START_GROUP: key(number, WIRE_END_GROUP) if self.rng.random() < 0.5 else b""}
        return self._base() + key(number, wire_type) + payload.get(wire_type, b"")

    def huge_varint(self) -> bytes:
        """A known field holding a varint at or past 64 bits, or an overlong or unfinished one."""
        number, _ = self._known_field()
        value = self.rng.choice((varint(2**64 - 1), varint(2**63), varint(-1), varint(2**32),
                                 varint(2**32 - 1), b"\xff" * 9 + b"\x01", b"\x80" * 9 + b"\x00",
                                 b"\xff" * 10 + b"\x01", b"\xff" * 5))
        return self._base() + key(number, WIRE_VARINT) + value

    def bad_length(self) -> bytes:
        """A length-delimited field claiming more bytes than follow (or a 10-byte length)."""
        number, _ = self._known_field()
        rest = self.rng.randbytes(self.rng.randrange(0, 8))
        length = self.rng.choice((len(rest) + 1, 2**31, 2**40, 2**64 - 1))
        return self._base() + key(number, WIRE_LEN) + varint(length) + rest

    def bad_utf8(self) -> bytes:
        """A string field (at any depth) holding bytes that are not UTF-8, such as a lone surrogate."""
        path = _string_field_path(self.message_class.DESCRIPTOR, self.rng)
        bad = self.rng.choice((b"\xc3\x28", b"\xed\xa0\x80", b"\xff", b"\xf4\x90\x80\x80", b"ok\x80"))
        if path is None:
            return self._base() + length_delimited(1, bad)
        data = bad
        for number in reversed(path):
            data = length_delimited(number, data)
        return self._base() + data

    def unknown_fields(self) -> bytes:
        """A message with fields appended whose numbers the type does not know, of every valid wire type."""
        known = {f.number for f in self.message_class.DESCRIPTOR.fields}
        data = self._base()
        for _ in range(self.rng.randrange(1, 6)):
            number = self.rng.choice((1000, 2**29 - 1, self.rng.randrange(1, 20_000)))
            if number not in known:
                data += self._unknown_field(number, depth=self.rng.randrange(0, 4))
        return data

    def _unknown_field(self, number: int, depth: int) -> bytes:
        wire_type = self.rng.choice((WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32, WIRE_START_GROUP))
        if wire_type == WIRE_START_GROUP:
            inner = self._unknown_field(1000 + depth, depth - 1) if depth > 0 else b""
            return key(number, WIRE_START_GROUP) + inner + key(number, WIRE_END_GROUP)
        return key(number, wire_type) + {WIRE_VARINT: varint(self.rng.randrange(2**64)),
                                         WIRE_I64: self.rng.randbytes(8), WIRE_I32: self.rng.randbytes(4),
                                         WIRE_LEN: varint(5) + self.rng.randbytes(5)}[wire_type]

    def deep_groups(self) -> bytes:
        """Unknown groups nested around protobuf's recursion limit (100) and far past it."""
        depth = self.rng.choice((50, 99, 100, 101, 150, 5000))
        return key(9999, WIRE_START_GROUP) * depth + key(9999, WIRE_END_GROUP) * depth

    def concatenated(self) -> bytes:
        """Two messages back to back: protobuf merges them into one."""
        return self.extreme() + self.extreme()


def _wire_type(field: FieldDescriptor) -> int:
    if field.cpp_type in (_F.CPPTYPE_MESSAGE, _F.CPPTYPE_STRING) or field.is_repeated:
        return WIRE_LEN
    if field.cpp_type in (_F.CPPTYPE_DOUBLE,) or field.type in (_F.TYPE_FIXED64, _F.TYPE_SFIXED64):
        return WIRE_I64
    if field.cpp_type == _F.CPPTYPE_FLOAT or field.type in (_F.TYPE_FIXED32, _F.TYPE_SFIXED32):
        return WIRE_I32
    return WIRE_VARINT


def _string_field_path(descriptor: Descriptor, rng: random.Random, depth: int = 0) -> list[int] | None:
    """Field numbers from `descriptor` down to a string field, or None when there is none within 3 levels."""
    fields = list(descriptor.fields)
    rng.shuffle(fields)
    for field in fields:
        if field.type == _F.TYPE_STRING:
            return [field.number]
        if field.cpp_type == _F.CPPTYPE_MESSAGE and depth < 2:
            below = _string_field_path(field.message_type, rng, depth + 1)
            if below is not None:
                return [field.number, *below]
    return None
