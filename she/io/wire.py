"""The versioned byte format of everything that crosses between client and server.

A message is::

    b"SHE" | format version (u8) | kind (u8) | 3 reserved zero bytes
    | metadata length (u32) | metadata (UTF-8 JSON object)
    | item count (u32) | for each item: length (u64) | bytes

Kinds: ``1`` a public context (one item: TenSEAL's serialised context), ``2`` ciphertexts
(one item per ciphertext, each in SEAL's own serialised format). All integers are
little-endian. Readers enforce the caps given by their caller before allocating anything.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError

MAGIC = b"SHE"
VERSION = 1
KIND_CONTEXT = 1
KIND_CIPHERTEXTS = 2
_PREFIX = struct.Struct("<3sBB3xI")
_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")
MAX_META_BYTES = 64 * 1024


@dataclass
class Message:
    """A decoded message: its kind, JSON metadata and raw items."""

    kind: int
    meta: dict[str, Any] = field(default_factory=dict)
    items: list[bytes] = field(default_factory=list)


def pack(kind: int, meta: dict[str, Any], items: list[bytes]) -> bytes:
    """Encode a message."""
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    parts = [_PREFIX.pack(MAGIC, VERSION, kind, len(meta_bytes)), meta_bytes,
             _COUNT.pack(len(items))]
    for item in items:
        parts.append(_LEN.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def unpack(data: bytes, *, kind: int, max_items: int, max_item_bytes: int) -> Message:
    """Decode and check a message of the expected ``kind``.

    Raises :class:`FormatError` for anything malformed, truncated, oversized or trailing.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError("message must be bytes")
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise FormatError(f"message too short ({len(view)} bytes)")
    magic, version, got_kind, meta_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise FormatError("not a SHE message (bad magic)")
    if version != VERSION:
        raise FormatError(f"SHE message format version {version} is not supported "
                          f"(this build reads version {VERSION})")
    if got_kind != kind:
        raise FormatError(f"expected a message of kind {kind}, got kind {got_kind}")
    if bytes(view[5:8]) != b"\0\0\0":
        raise FormatError("reserved header bytes must be zero")
    if meta_len > MAX_META_BYTES:
        raise FormatError("message metadata too large")
    pos = _PREFIX.size
    if len(view) < pos + meta_len + _COUNT.size:
        raise FormatError("message truncated in its metadata")
    try:
        meta = json.loads(bytes(view[pos:pos + meta_len]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"message metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise FormatError("message metadata must be a JSON object")
    pos += meta_len
    (count,) = _COUNT.unpack_from(view, pos)
    pos += _COUNT.size
    if count > max_items:
        raise FormatError(f"message holds {count} items, at most {max_items} are allowed")
    items = []
    for i in range(count):
        if len(view) < pos + _LEN.size:
            raise FormatError(f"message truncated before item {i}")
        (length,) = _LEN.unpack_from(view, pos)
        pos += _LEN.size
        if length > max_item_bytes:
            raise FormatError(f"item {i} has {length} bytes, at most {max_item_bytes} allowed")
        if len(view) < pos + length:
            raise FormatError(f"message truncated in item {i}")
        items.append(bytes(view[pos:pos + length]))
        pos += length
    if pos != len(view):
        raise FormatError(f"{len(view) - pos} unexpected bytes after the last item")
    return Message(kind, meta, items)


def batch_size(meta: dict[str, Any], capacity: int) -> int:
    """The ``batch`` field of a ciphertext message, checked to be an integer in 1..capacity."""
    batch = meta.get("batch")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= capacity:
        raise FormatError(f"invalid batch size {batch!r} (expected an integer from 1 to {capacity})")
    return batch
