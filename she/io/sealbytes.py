"""SEAL's serialised ciphertext format, read into and written from numpy arrays, and the
layout of its seeded key-switching keys (checked before SEAL loads any).

A serialised SEAL ciphertext is a 16-byte header followed by a body that is stored
raw, zlib- or zstd-compressed::

    header  : magic 0xA15E (u16) | header size 16 (u8) | version major, minor (u8, u8)
              | compression mode (u8: 0 none, 1 zlib, 2 zstd) | reserved (u16) | total size (u64)
    body    : parms_id (4 x u64) | is_ntt_form (u8) | size (u64) | poly_modulus_degree (u64)
              | coeff_modulus_size (u64) | scale (f64) | correction_factor (u64)
              | nested DynArray: 16-byte header (never compressed) | count (u64) | count x u64

The coefficient data is ``size`` polynomials x ``coeff_modulus_size`` RNS limbs x ``N``
coefficients, which is exactly the ``(size, L, N)`` uint64 array the engine computes on.

Everything here treats its input as untrusted: sizes are checked before anything is
allocated or decompressed, every coefficient is checked to be below its modulus, and a
ciphertext whose polynomials after the first are all zero (transparent) is refused.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

from ..errors import FormatError

MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")
_BODY = struct.Struct("<4QBQQQdQ")
_COUNT = struct.Struct("<Q")
_PARMS_ID = struct.Struct("<4Q")
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
#: A seeded ciphertext ends with SEAL's UniformRandomGeneratorInfo: a 16-byte header, the
#: generator type (u8: 1 Blake2xb, 2 SHAKE-256) and a 512-bit seed.
SEED_INFO_SIZE = _HEADER.size + 1 + 64
_PRNG_TYPES = (1, 2)
#: The SEAL format version TenSEAL 0.3.18 writes and accepts (SEAL 4.3); checked by the tests.
SEAL_VERSION = (4, 3)


@dataclass(frozen=True)
class LevelSpec:
    """What a valid ciphertext at one level of the modulus chain looks like."""

    parms_id: tuple[int, int, int, int]
    moduli: tuple[int, ...]
    poly_modulus_degree: int
    ntt_form: bool

    @property
    def limbs(self) -> int:
        return len(self.moduli)

    def raw_size(self, size: int = 2, *, seeded: bool = False) -> int:
        """Bytes of the uncompressed body for a ciphertext of ``size`` polynomials (only the
        first of which is stored, followed by the seed of the second, when ``seeded``)."""
        stored = 1 if seeded else size
        return (_BODY.size + _HEADER.size + _COUNT.size
                + 8 * stored * self.limbs * self.poly_modulus_degree + (SEED_INFO_SIZE if seeded else 0))


@dataclass
class RawCiphertext:
    """A ciphertext as numpy data: ``data`` has shape ``(size, limbs, N)``, dtype uint64."""

    data: np.ndarray
    scale: float
    parms_id: tuple[int, int, int, int]
    ntt_form: bool = True
    correction_factor: int = 1
    #: Seeded form (``data`` holds the first polynomial only): SEAL's record of the seed the
    #: second one is drawn from.
    seed_info: bytes | None = None


def _decompress(mode: int, payload: bytes, limit: int, what: str = "ciphertext") -> bytes:
    """Decompress exactly one stream from ``payload``, never producing more than ``limit`` bytes.

    Trailing bytes after the compressed stream, a truncated stream and an oversized
    output are all rejected (``what`` names the object in the messages).
    """
    if mode == COMPR_NONE:
        out, complete, trailing = payload, True, b""
    elif mode == COMPR_ZSTD:
        out, complete, trailing = _zstd_bounded(payload, limit, what)
    elif mode == COMPR_ZLIB:
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(payload, limit + 1)
        except zlib.error as exc:
            raise FormatError(f"{what} body does not decompress: {exc}") from exc
        complete, trailing = inflater.eof, inflater.unused_data
    else:
        raise FormatError(f"unknown SEAL compression mode {mode}")
    if len(out) > limit:
        raise FormatError(f"{what} body is larger than the model allows")
    if not complete:
        raise FormatError(f"{what} body is truncated")
    if trailing:
        raise FormatError(f"{len(trailing)} unexpected bytes after the {what} body")
    return out


def unwrap(blob: bytes, limit: int, what: str = "ciphertext") -> bytes:
    """The body of one serialised SEAL object (ciphertext, keys, parameters): the header
    checked (magic, header size, format version, total size) and the body decompressed to
    at most ``limit`` bytes, so nothing larger is ever allocated."""
    if len(blob) < _HEADER.size:
        raise FormatError(f"{what} too short ({len(blob)} bytes)")
    magic, hsize, major, _minor, mode, _reserved, total = _HEADER.unpack_from(blob)
    if magic != MAGIC or hsize != _HEADER.size:
        raise FormatError(f"not a SEAL {what} (bad magic number or header size)")
    if major != SEAL_VERSION[0]:
        raise FormatError(f"{what}: SEAL format version {major} is not supported (expected 4)")
    if total != len(blob):
        raise FormatError(f"{what}: SEAL header says {total} bytes but {len(blob)} were given")
    return _decompress(mode, bytes(memoryview(blob)[_HEADER.size:]), limit, what)


def wrap(body: bytes, *, compress: bool = False) -> bytes:
    """A SEAL serialisation of ``body`` (what :func:`unwrap` returns): SEAL's header, then
    the body raw or, with ``compress``, zstd-compressed."""
    mode = COMPR_NONE
    if compress:
        body, mode = zstandard.ZstdCompressor(level=1).compress(body), COMPR_ZSTD
    return _HEADER.pack(MAGIC, _HEADER.size, *SEAL_VERSION, mode, 0, _HEADER.size + len(body)) + body


#: Input fed to zstd per step: one RLE block expands 4 bytes to at most 128 KiB, so a
#: 2 KiB step can never produce more than 64 MiB past the limit before it is noticed.
_ZSTD_STEP = 2048


def _zstd_bounded(payload: bytes, limit: int, what: str) -> tuple[bytes, bool, bytes]:
    inflater = zstandard.ZstdDecompressor().decompressobj()
    parts: list[bytes] = []
    produced = 0
    view = memoryview(payload)
    try:
        for start in range(0, len(view), _ZSTD_STEP):
            chunk = inflater.decompress(view[start:start + _ZSTD_STEP])
            parts.append(chunk)
            produced += len(chunk)
            if produced > limit or inflater.eof:
                break
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what} body does not decompress: {exc}") from exc
    return b"".join(parts), inflater.eof, inflater.unused_data


def parse(blob: bytes, level: LevelSpec, *, size: int = 2, seeded: bool = False,
          out: np.ndarray | None = None) -> RawCiphertext:
    """Parse and validate one serialised SEAL ciphertext expected at ``level``.

    ``seeded``: the ciphertext must be in SEAL's seeded form (what a symmetric encryption
    saves: the first polynomial, then the seed SEAL expands the second from); the result
    then holds the first polynomial only, ``data`` of shape ``(1, limbs, N)``.

    ``out``: an array of the data's shape to copy the coefficients into (else a new one).

    Raises :class:`FormatError` with a precise reason on anything unexpected.
    """
    expected = level.raw_size(size, seeded=seeded)
    body = unwrap(blob, expected)
    if len(body) != expected:
        raise FormatError(
            f"ciphertext body has {len(body)} bytes, expected {expected} for a "
            f"{size}-polynomial ciphertext with {level.limbs} RNS limbs of degree "
            f"{level.poly_modulus_degree}"
        )
    *pid, ntt, ct_size, degree, limbs, scale, corr = _BODY.unpack_from(body)
    if tuple(pid) != level.parms_id:
        raise FormatError("ciphertext was made with other encryption parameters (parms_id mismatch)")
    if (ct_size, degree, limbs) != (size, level.poly_modulus_degree, level.limbs):
        raise FormatError(
            f"ciphertext shape (size {ct_size}, degree {degree}, limbs {limbs}) does not match "
            f"(size {size}, degree {level.poly_modulus_degree}, limbs {level.limbs})"
        )
    if bool(ntt) != level.ntt_form:
        raise FormatError("ciphertext NTT form does not match the scheme")
    if not np.isfinite(scale) or scale <= 0:
        raise FormatError(f"ciphertext scale {scale!r} is not a positive number")
    if corr != 1:
        raise FormatError(f"ciphertext correction factor {corr} is not supported (expected 1)")
    nested = _BODY.size
    n_magic, n_hsize, _, _, n_mode, _, _ = _HEADER.unpack_from(body, nested)
    if n_magic != MAGIC or n_hsize != _HEADER.size or n_mode != COMPR_NONE:
        raise FormatError("malformed coefficient array header")
    stored = 1 if seeded else size
    (count,) = _COUNT.unpack_from(body, nested + _HEADER.size)
    if count != stored * level.limbs * level.poly_modulus_degree:
        raise FormatError("coefficient count does not match the ciphertext shape")
    start = nested + _HEADER.size + _COUNT.size
    seed_info = None
    if seeded:
        seed_info = body[start + 8 * count:]
        check_seed_info(seed_info)
    data = np.frombuffer(body, dtype="<u8", offset=start, count=count).reshape(stored, level.limbs, -1)
    moduli = np.asarray(level.moduli, dtype=np.uint64)[None, :, None]
    if np.any(data >= moduli):
        raise FormatError("ciphertext coefficient out of range for its modulus")
    if stored > 1 and not np.any(data[1:]):
        # SEAL refuses to compute on such a "transparent" ciphertext, and as a public key
        # it would turn re-randomisation into adding plain noise
        raise FormatError("ciphertext is transparent (its polynomials after the first are "
                          "zero): not an encryption")
    if out is None:
        out = data.copy()
    else:
        out[...] = data
    return RawCiphertext(out, float(scale), level.parms_id, bool(ntt), int(corr), seed_info)


def switching_keys_size(level: LevelSpec, entries: int, keys: int) -> int:
    """Bytes of the uncompressed body of SEAL's key-switching keys (``RelinKeys``,
    ``GaloisKeys``) in seeded form: ``entries`` slots of which ``keys`` are filled, each
    with one seeded ciphertext per ciphertext prime at the key ``level`` (every prime,
    the special one included)."""
    key = _HEADER.size + level.raw_size(2, seeded=True)
    return _PARMS_ID.size + _COUNT.size * (1 + entries) + keys * (level.limbs - 1) * key


def switching_key_entries(body: bytes, level: LevelSpec, entries: int, what: str) -> list[int]:
    """Read the body of SEAL's seeded key-switching keys (``RelinKeys``, ``GaloisKeys``).

    The layout: ``parms_id`` (4 x u64), the number of entries (u64), then for every entry
    the number of its keys (u64, 0 for an empty entry) and the keys, each an uncompressed
    seeded ciphertext at the key ``level``. Every key is checked as a ciphertext
    (:func:`parse`); an entry holds one key per ciphertext prime or none.

    Returns the indices of the filled entries. Raises :class:`FormatError` on another
    ``parms_id``, another number of entries, a malformed key, truncation or trailing bytes.
    """
    key_size = _HEADER.size + level.raw_size(2, seeded=True)
    parts = level.limbs - 1
    filled = []
    try:
        if _PARMS_ID.unpack_from(body) != level.parms_id:
            raise FormatError(f"{what} keys were made for other encryption parameters "
                              "(parms_id mismatch)")
        pos = _PARMS_ID.size
        (count,) = _COUNT.unpack_from(body, pos)
        pos += _COUNT.size
        if count != entries:
            raise FormatError(f"{what} keys hold {count} entries, expected {entries}")
        for index in range(entries):
            (n,) = _COUNT.unpack_from(body, pos)
            pos += _COUNT.size
            if n == 0:
                continue
            if n != parts:
                raise FormatError(f"{what} keys: entry {index} has {n} parts, expected {parts}")
            for _ in range(n):
                if _HEADER.unpack_from(body, pos)[4] != COMPR_NONE:
                    raise FormatError(f"{what} keys: entry {index} is compressed inside")
                try:
                    parse(body[pos:pos + key_size], level, seeded=True)
                except FormatError as exc:
                    raise FormatError(f"{what} keys: entry {index}: {exc}") from exc
                pos += key_size
            filled.append(index)
    except struct.error as exc:
        raise FormatError(f"{what} keys are truncated") from exc
    if pos != len(body):
        raise FormatError(f"{len(body) - pos} unexpected bytes after the {what} keys")
    return filled


def check_seed_info(record: bytes) -> None:
    """Validate the UniformRandomGeneratorInfo that ends a seeded ciphertext body."""
    if len(record) != SEED_INFO_SIZE:
        raise FormatError("malformed seed of a seeded ciphertext")
    magic, hsize, major, _minor, mode, _reserved, total = _HEADER.unpack_from(record)
    if (magic, hsize, major, mode, total) != (MAGIC, _HEADER.size, SEAL_VERSION[0], COMPR_NONE,
                                               SEED_INFO_SIZE):
        raise FormatError("malformed seed of a seeded ciphertext")
    if record[_HEADER.size] not in _PRNG_TYPES:
        raise FormatError("seeded ciphertext names an unknown random generator")


def serialize(ct: RawCiphertext, *, compress: bool = False) -> bytes:
    """Write ``ct`` in SEAL's format (uncompressed, or zstd-compressed if ``compress``);
    in its seeded form when it carries a seed record."""
    stored, limbs, degree = ct.data.shape
    size = stored + (ct.seed_info is not None)
    count = stored * limbs * degree
    nested = _HEADER.pack(MAGIC, _HEADER.size, *SEAL_VERSION, COMPR_NONE, 0,
                          _HEADER.size + _COUNT.size + 8 * count)
    body = b"".join((
        _BODY.pack(*ct.parms_id, int(ct.ntt_form), size, degree, limbs, ct.scale,
                   ct.correction_factor),
        nested,
        _COUNT.pack(count),
        np.ascontiguousarray(ct.data, dtype="<u8").tobytes(),
        ct.seed_info or b"",
    ))
    return wrap(body, compress=compress)
