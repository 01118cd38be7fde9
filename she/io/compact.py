"""The compact upload of single packing: a fresh ciphertext in about a fifth of SEAL's
seeded form (the TenSEAL-tutorial network: 63.7 KB where SEAL writes 328 KB, 167 KB with
zstd).

A fresh symmetric encryption is ``(c0, c1)`` with ``c1 = a`` drawn from a seed, so SEAL's
seeded form already sends only ``c0`` and the seed. Two more halvings:

* **Exact width.** ``c0`` is uniform modulo the product ``Q`` of the ciphertext primes, but
  SEAL stores every RNS residue in 64 bits (and zstd cannot compress uniform residues).
  Here each coefficient, rebuilt from its residues (CRT) in coefficient form, takes
  ``ceil(log2 Q)`` bits, less ``d`` low bits rounded away (to the nearest multiple of
  ``2^d``, as compressed lattice ciphertexts do): that adds at most ``2^(d-1)`` to each
  coefficient of the noise, which the compiler budgets for (``Plan.input_drop_bits``; the
  value is public, anyone holding ``c0`` could round it).
* **Folding by conjugation.** The inputs are real, so the plaintext ``m`` is fixed by the
  conjugation ``tau: X -> X^-1`` (``tau(m) = m``). Writing ``T(p) = p + tau(p)``:
  ``T(c0) + T(a s) = T(m + e) = 2m + e + tau(e)``, and ``T(c0)`` has only ``N/2`` free
  coefficients (``T(c0)_j = c0_j - c0_(N-j)`` for ``0 < j < N/2``, ``2 c0_0`` at 0, 0 at
  ``N/2``, the upper half the negated mirror). The client sends ``w_0 = c0_0`` and
  ``w_j = c0_j - c0_(N-j) mod Q`` for ``0 < j < N/2``; the server rebuilds ``v = (w_0, ...,
  w_(N/2-1), 0, ..., 0)``, for which ``T(v) = T(c0)``, and computes
  ``(v, a) + conjugate((v, a))`` with the client's conjugation key: a ciphertext of ``2m``
  (its ``a``-parts key-switched from ``tau(s)`` to ``s``). The client encodes at half the
  plan's input scale, so the result has exactly that scale; its noise is ``e + tau(e)``, the
  dropped bits' rounding (each coefficient once) and one key switch. Sending ``w`` reveals
  nothing beyond the ciphertext it is computed from.

Format::

    b"SHEi" | version (u8) | dropped bits d (u8) | width w (u16) | scale after folding (f64)
    | SEAL's 81-byte seed record | N/2 coefficients of w bits each, little-endian bit order
      (N/2 is a multiple of 8, so they fill whole bytes)

The reader checks every field against the level it expects and every coefficient against
its range before anything is rebuilt.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import tenseal.sealapi as sealapi

from ..errors import FormatError
from .context import SealBridge
from .sealbytes import SEED_INFO_SIZE, LevelSpec, RawCiphertext, check_seed_info

MAGIC = b"SHEi"
VERSION = 2
_HEADER = struct.Struct("<4sBBHd")
#: Most low bits a spec may ask to drop (a client refuses more: the noise would swamp any
#: input encrypted at a usable scale).
MAX_DROP_BITS = 30
#: Unfolding doubles the encrypted values: the client encodes at the plan's input scale
#: divided by this, and the header carries the scale after unfolding.
FOLD_GAIN = 2


def coefficient_width(moduli: Sequence[int], drop_bits: int) -> int:
    """Bits per coefficient once ``drop_bits`` low bits are rounded away."""
    return _largest(_modulus(moduli), drop_bits).bit_length()


def packed_size(moduli: Sequence[int], degree: int, drop_bits: int) -> int:
    """Bytes of a compact ciphertext."""
    return (_HEADER.size + SEED_INFO_SIZE
            + degree // 2 * coefficient_width(moduli, drop_bits) // 8)


def pack(c0: np.ndarray, moduli: Sequence[int], drop_bits: int, scale: float,
         seed_info: bytes) -> bytes:
    """The compact form of ``c0`` (``(L, N)`` residues in coefficient form) and its seed;
    ``scale``: the scale the folded ciphertext has (twice the encoding scale)."""
    if len(seed_info) != SEED_INFO_SIZE:
        raise ValueError(f"seed record must have {SEED_INFO_SIZE} bytes")
    q = _modulus(moduli)
    values = _compose(c0, moduli)
    half = len(values) // 2
    folded = np.concatenate([values[:1], values[1:half] - values[:half:-1]]) % q
    if drop_bits:
        folded = (folded + (1 << (drop_bits - 1))) >> drop_bits
    width = coefficient_width(moduli, drop_bits)
    header = _HEADER.pack(MAGIC, VERSION, drop_bits, width, scale)
    return header + seed_info + _pack_bits(folded, width)


def unpack(blob: bytes, moduli: Sequence[int], degree: int,
           drop_bits: int) -> tuple[np.ndarray, float, bytes]:
    """Read a compact ciphertext expected with these primes, ring size and dropped bits.

    Returns ``(v, scale, seed_info)``: ``v`` as ``(L, N)`` uint64 residues in coefficient
    form (the sent half, zeros above), to be conjugated and added (see the module text).
    Raises :class:`FormatError` on anything unexpected.
    """
    q = _modulus(moduli)
    largest = _largest(q, drop_bits)
    expected = packed_size(moduli, degree, drop_bits)
    if len(blob) != expected:
        raise FormatError(f"compact ciphertext has {len(blob)} bytes, expected {expected}")
    magic, version, got_drop, width, scale = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise FormatError("not a compact SHE ciphertext (bad magic)")
    if version != VERSION:
        raise FormatError(f"compact ciphertext version {version} is not supported")
    if got_drop != drop_bits or width != largest.bit_length():
        raise FormatError(f"compact ciphertext drops {got_drop} bits at width {width}; this "
                          f"model expects {drop_bits} at {largest.bit_length()}")
    if not math.isfinite(scale) or scale <= 0:
        raise FormatError(f"ciphertext scale {scale!r} is not a positive number")
    start = _HEADER.size + SEED_INFO_SIZE
    seed_info = bytes(blob[_HEADER.size:start])
    check_seed_info(seed_info)
    values = _unpack_bits(memoryview(blob)[start:], degree // 2, width)
    if any(v > largest for v in values):
        raise FormatError("compact ciphertext coefficient out of range")
    full = (values * (1 << drop_bits)) % q if drop_bits else values
    v = np.zeros((len(moduli), degree), dtype=np.uint64)
    for row, m in zip(v, moduli, strict=True):
        row[:degree // 2] = (full % int(m)).astype(np.uint64)
    return v, scale, seed_info


def unfold(bridge: SealBridge, level: LevelSpec, v: np.ndarray, scale: float, seed_info: bytes,
           galois: sealapi.GaloisKeys) -> sealapi.Ciphertext:
    """The ciphertext of the input from :func:`unpack`'s result: SEAL expands ``(v, a)``
    from the seed, and the sum with its conjugate (``galois`` holds the conjugation key) is
    the ciphertext the client folded, at ``scale``."""
    ct = bridge.to_seal(RawCiphertext(bridge.transform(v, to_ntt=True)[None], scale,
                                      level.parms_id, seed_info=seed_info))
    evaluator = sealapi.Evaluator(bridge.seal)
    conjugate = sealapi.Ciphertext()
    evaluator.complex_conjugate(ct, galois, conjugate)
    evaluator.add_inplace(ct, conjugate)
    return ct


def _modulus(moduli: Sequence[int]) -> int:
    return math.prod(int(m) for m in moduli)


def _largest(q: int, drop_bits: int) -> int:
    """The largest value a coefficient modulo ``q`` can take after rounding."""
    return (q - 1 + ((1 << drop_bits) >> 1)) >> drop_bits


def _compose(residues: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    """Integers (object array of Python ints, not reduced) from their RNS residues (CRT)."""
    q = _modulus(moduli)
    total = np.zeros(residues.shape[1], dtype=object)
    for row, m in zip(residues, moduli, strict=True):
        m = int(m)
        q_hat = q // m
        total = total + (row.astype(object) * pow(q_hat, -1, m) % m) * q_hat
    return total


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    per = (width + 7) // 8
    raw = np.frombuffer(b"".join(int(v).to_bytes(per, "little") for v in values), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(values), per), axis=1, bitorder="little")[:, :width]
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def _unpack_bits(data: memoryview, count: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    per = (width + 7) // 8
    rows = np.zeros((count, 8 * per), dtype=np.uint8)
    rows[:, :width] = bits.reshape(count, width)
    packed = np.packbits(rows, axis=1, bitorder="little")
    return np.array([int.from_bytes(row.tobytes(), "little") for row in packed], dtype=object)
