"""The SHE message format: round trips, and FormatError for every malformed message."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import she
from she.io import wire

KIND = wire.KIND_CIPHERTEXTS
META = {"fingerprint": "0123456789abcdef", "batch": 3, "model": "toy", "nested": {"a": [1, 2.5]}}
ITEMS = [b"first item", b"", bytes(range(256)) * 3]
LIMITS = {"max_items": 4, "max_item_bytes": 1024}
PREFIX = struct.Struct("<3sBB3xI")


def _unpack(data: bytes, kind: int = KIND, **limits) -> wire.Message:
    return wire.unpack(data, kind=kind, **{**LIMITS, **limits})


def _raw_message(meta: bytes, items: list[bytes], *, magic: bytes = b"SHE", version: int = 1,
                 kind: int = KIND, count: int | None = None) -> bytes:
    """A message assembled by hand (so that each field can be made wrong on its own)."""
    parts = [PREFIX.pack(magic, version, kind, len(meta)), meta,
             struct.pack("<I", len(items) if count is None else count)]
    for item in items:
        parts += [struct.pack("<Q", len(item)), item]
    return b"".join(parts)


@pytest.fixture()
def good() -> bytes:
    return wire.pack(KIND, META, ITEMS)


def test_round_trip(good):
    msg = _unpack(good)
    assert msg.kind == KIND
    assert msg.meta == META
    assert msg.items == ITEMS
    # pack is deterministic, and the hand-made layout is the documented one.
    assert good == wire.pack(KIND, META, ITEMS)
    assert good == _raw_message(json.dumps(META, sort_keys=True).encode(), ITEMS)


def test_round_trip_context_kind_and_empty_message():
    data = wire.pack(wire.KIND_CONTEXT, {}, [])
    msg = wire.unpack(data, kind=wire.KIND_CONTEXT, max_items=1, max_item_bytes=0)
    assert (msg.kind, msg.meta, msg.items) == (wire.KIND_CONTEXT, {}, [])


def test_bytearray_and_memoryview_inputs(good):
    assert _unpack(bytearray(good)).items == ITEMS
    assert _unpack(memoryview(good)).meta == META


def test_limits_are_inclusive(good):
    msg = _unpack(good, max_items=len(ITEMS), max_item_bytes=max(map(len, ITEMS)))
    assert msg.items == ITEMS


def test_header_layout(good):
    assert good[:8] == b"SHE\x01\x02\0\0\0"  # magic, version 1, kind 2, reserved


def test_bytes_are_the_documented_ones():
    """Expected bytes written out by hand from docs/http-api.md, not from the module."""
    expected = bytes.fromhex(
        "534845" "01" "01" "000000"        # "SHE", version 1, kind 1 (context), reserved
        "0c000000" + b'{"batch": 1}'.hex()  # metadata length 12 (u32 LE), JSON
        + "02000000"                        # two items
        + "0200000000000000" + b"ab".hex()  # length 2 (u64 LE), bytes
        + "0000000000000000")               # an empty item
    assert wire.pack(wire.KIND_CONTEXT, {"batch": 1}, [b"ab", b""]) == expected
    msg = wire.unpack(expected, kind=1, max_items=2, max_item_bytes=2)
    assert (msg.meta, msg.items) == ({"batch": 1}, [b"ab", b""])


def test_not_bytes():
    with pytest.raises(she.FormatError, match="bytes"):
        wire.unpack("SHE text", kind=KIND, **LIMITS)


@pytest.mark.parametrize("n", [0, 1, 5, PREFIX.size - 1])
def test_short_data(good, n):
    with pytest.raises(she.FormatError, match="too short"):
        _unpack(good[:n])


def test_bad_magic(good):
    for magic in (b"SHF", b"she", b"\0\0\0"):
        with pytest.raises(she.FormatError, match="magic"):
            _unpack(magic + good[3:])


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version(good, version):
    data = good[:3] + bytes([version]) + good[4:]
    with pytest.raises(she.FormatError, match=f"version {version} is not supported"):
        _unpack(data)


def test_wrong_kind(good):
    with pytest.raises(she.FormatError, match="expected a message of kind 1, got kind 2"):
        _unpack(good, kind=wire.KIND_CONTEXT)
    data = good[:4] + bytes([7]) + good[5:]
    with pytest.raises(she.FormatError, match="kind"):
        _unpack(data)


@pytest.mark.parametrize("offset", [5, 6, 7])
def test_nonzero_reserved_bytes(good, offset):
    data = bytearray(good)
    data[offset] = 1
    with pytest.raises(she.FormatError, match="reserved"):
        _unpack(bytes(data))


@pytest.mark.parametrize("meta", [b"not json", b"{\"a\": ", b"\xff\xfe{}", b"{'a': 1}", b""])
def test_metadata_not_json(meta):
    with pytest.raises(she.FormatError, match="not JSON"):
        _unpack(_raw_message(meta, []))


@pytest.mark.parametrize("meta", [b"[1, 2]", b"\"text\"", b"3", b"null", b"true"])
def test_metadata_not_an_object(meta):
    with pytest.raises(she.FormatError, match="JSON object"):
        _unpack(_raw_message(meta, []))


@pytest.mark.parametrize("meta", [
    b"[" * 30_000 + b"]" * 30_000,          # deeply nested (valid) JSON
    b"{\"a\": " + b"7" * 5_000 + b"}",        # an integer too long for Python's int()
], ids=["deep-nesting", "long-integer"])
def test_hostile_metadata_is_a_format_error(meta):
    """Metadata within the size cap that json.loads cannot decode is still a FormatError."""
    assert len(meta) <= wire.MAX_META_BYTES
    with pytest.raises(she.FormatError):
        _unpack(_raw_message(meta, []))


def test_metadata_too_large():
    meta = json.dumps({"pad": "x" * wire.MAX_META_BYTES}).encode()
    with pytest.raises(she.FormatError, match="metadata too large"):
        _unpack(_raw_message(meta, []))


def test_metadata_length_beyond_data(good):
    data = bytearray(good)
    struct.pack_into("<I", data, 8, len(good))  # metadata length runs past the end
    with pytest.raises(she.FormatError, match="truncated"):
        _unpack(bytes(data))


def test_too_many_items(good):
    with pytest.raises(she.FormatError, match="3 items, at most 2"):
        _unpack(good, max_items=2)
    # A huge count is refused before any item is read.
    data = _raw_message(b"{}", [], count=2 ** 32 - 1)
    with pytest.raises(she.FormatError, match="items"):
        _unpack(data)


def test_oversized_item(good):
    with pytest.raises(she.FormatError, match="item 2 has 768 bytes, at most 767"):
        _unpack(good, max_item_bytes=767)
    # A length field of 2^64 - 1 with a tiny body.
    data = _raw_message(b"{}", [b"abc"])
    data = data[: -len(b"abc") - 8] + struct.pack("<Q", 2 ** 64 - 1) + b"abc"
    with pytest.raises(she.FormatError, match="item 0"):
        _unpack(data)


def test_truncated_item(good):
    with pytest.raises(she.FormatError, match="truncated in item 2"):
        _unpack(good[:-1])
    # Cut inside an item's length field.
    cut = len(_raw_message(json.dumps(META, sort_keys=True).encode(), ITEMS[:2])) + 3
    with pytest.raises(she.FormatError, match="truncated before item 2"):
        _unpack(good[:cut])
    # Count promises more items than present.
    data = _raw_message(b"{}", [b"x"], count=2)
    with pytest.raises(she.FormatError, match="truncated before item 1"):
        _unpack(data)


def test_trailing_bytes(good):
    with pytest.raises(she.FormatError, match="5 unexpected bytes"):
        _unpack(good + b"extra")
    with pytest.raises(she.FormatError, match="unexpected bytes"):
        _unpack(good + b"\0")


def test_every_truncation_is_refused(good):
    for n in range(len(good)):
        with pytest.raises(she.FormatError):
            _unpack(good[:n])


# -- property tests ----------------------------------------------------------------------------

SAMPLE = wire.pack(KIND, {"fingerprint": "ab" * 8, "batch": 2}, [b"\x01" * 40, b"\x02" * 17])
PROPERTY = settings(max_examples=300, deadline=None)


def _only_format_errors(data: bytes) -> wire.Message | None:
    try:
        msg = wire.unpack(data, kind=KIND, max_items=4, max_item_bytes=64)
    except she.FormatError:
        return None
    # Whatever is accepted respects the caller's limits and is a JSON object.
    assert len(msg.items) <= 4 and all(len(i) <= 64 for i in msg.items)
    assert isinstance(msg.meta, dict)
    return msg


@PROPERTY
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_format_error(data):
    _only_format_errors(data)


@PROPERTY
@given(data=st.binary(max_size=200))
def test_random_bytes_after_a_valid_prefix(data):
    # Past the magic/version/kind checks, so the deeper fields see random data too.
    _only_format_errors(SAMPLE[:8] + data)


@PROPERTY
@given(pos=st.integers(0, len(SAMPLE) - 1), value=st.integers(0, 255))
def test_single_byte_mutations(pos, value):
    mutated = bytearray(SAMPLE)
    mutated[pos] = value
    msg = _only_format_errors(bytes(mutated))
    if bytes(mutated) == SAMPLE:
        assert msg is not None and msg.items == [b"\x01" * 40, b"\x02" * 17]


@PROPERTY
@given(cut=st.integers(0, len(SAMPLE)), pos=st.integers(0, len(SAMPLE) - 1),
       value=st.integers(0, 255))
def test_mutation_then_truncation(cut, pos, value):
    mutated = bytearray(SAMPLE)
    mutated[pos] = value
    msg = _only_format_errors(bytes(mutated[:cut]))
    if cut < len(SAMPLE) and bytes(mutated) == SAMPLE:
        assert msg is None  # every proper prefix of a valid message is refused
