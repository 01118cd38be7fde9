"""TenSEAL contexts: creating them, exporting the public part, and checking uploads.

Keys are generated and held by TenSEAL/SEAL only. The client creates a context that
carries the secret key; what it sends is :func:`public_context_bytes` (the parameters, no
key at all) with :func:`relin_key_bytes` and, for single packing, :func:`galois_key_bytes`
(evaluation keys in SEAL's seeded form, half the size of their expanded form). A server
accepts a context through :func:`load_public_context`, which reads the upload itself
(TenSEAL never parses it) and refuses one that carries any key or whose parameters differ
from the plan's, then builds the context from the plan; and the keys through
:func:`load_relin_keys` and :func:`load_galois_keys`, which accept exactly the keys the
plan needs, of exactly their size, checked before anything is decompressed past that
size or handed to SEAL.

This module also moves ciphertexts between SEAL objects and the numpy arrays the engine
computes on (:class:`SealBridge`): SEAL's Python bindings load and save ciphertexts
through files only, so the bridge uses a private directory in shared memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from ..errors import FormatError, ParameterError, SecurityError
from ..plan.params import EncryptionParameters
from . import sealbytes

KeysT = TypeVar("KeysT", sealapi.RelinKeys, sealapi.GaloisKeys, sealapi.PublicKey)
_SEAL_MAGIC = sealbytes.MAGIC.to_bytes(2, "little")

#: Refuse uploaded contexts larger than this many bytes.
MAX_CONTEXT_BYTES = 256 * 1024 * 1024


def new_secret_context(params: EncryptionParameters) -> ts.Context:
    """A fresh CKKS or BFV context with secret, public and relinearisation keys."""
    try:
        if params.scheme == "bfv":
            ctx = ts.context(ts.SCHEME_TYPE.BFV, params.poly_modulus_degree,
                             plain_modulus=params.plain_modulus,
                             coeff_mod_bit_sizes=list(params.modulus_bits))
        else:
            ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                             coeff_mod_bit_sizes=list(params.modulus_bits))
    except ValueError as exc:
        raise ParameterError(f"SEAL refused the parameters: {exc}") from exc
    check_matches(ctx, params)
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """Serialise the parameters of ``ctx`` only: no secret key, no public key (the client
    encrypts with its secret key, so the server never needs one) and no evaluation keys,
    which travel separately in SEAL's smaller seeded form (:func:`relin_key_bytes`)."""
    return ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                         save_relin_keys=False)


def context_primes(ctx: ts.Context) -> tuple[int, ...]:
    """All primes of ``ctx``'s coefficient modulus, special prime last."""
    parms = ctx.seal_context().data.key_context_data().parms()
    return tuple(m.value() for m in parms.coeff_modulus())


def check_matches(ctx: ts.Context, params: EncryptionParameters) -> None:
    """Raise :class:`ParameterError` if ``ctx`` was not made for ``params``."""
    parms = ctx.seal_context().data.key_context_data().parms()
    if parms.scheme().name != params.scheme.upper():
        raise ParameterError(f"context is a {parms.scheme().name} context, the model needs "
                             f"{params.scheme.upper()}")
    if params.scheme == "bfv" and parms.plain_modulus().value() != params.plain_modulus:
        raise ParameterError("context plaintext modulus differs from the model's parameters")
    if parms.poly_modulus_degree() != params.poly_modulus_degree:
        raise ParameterError(
            f"context has N={parms.poly_modulus_degree()}, the model needs "
            f"N={params.poly_modulus_degree}"
        )
    if context_primes(ctx) != params.primes:
        raise ParameterError("context coefficient modulus differs from the model's parameters")


def load_public_context(data: bytes, params: EncryptionParameters) -> ts.Context:
    """The server's context for an uploaded public context (item 0 of a context message).

    The upload is read here as the protobuf message TenSEAL writes (``TenSEALContextProto``)
    and never handed to TenSEAL: it must hold SEAL's encryption parameters, equal to
    ``params``, and nothing else. A secret key (the private part) is refused with
    :class:`SecurityError`; a public, relinearisation or Galois key, or any field TenSEAL
    does not write, with :class:`FormatError`; other parameters with
    :class:`ParameterError`. Only then is the context built, from ``params`` on the server
    (a key-less context: SEAL's tables for these parameters, no key generation).
    """
    check_public_context(data, params)
    ctx = ts.context_from(_parameters_only_context(params))
    check_matches(ctx, params)
    return ctx


#: Largest SEAL parameter serialisation accepted (uncompressed: a few bytes per prime).
_MAX_PARMS_BYTES = 4096
_SCHEMES = {"bfv": 1, "ckks": 2}
#: Protobuf wire types: integer, 64-bit value, length-delimited bytes.
_VARINT, _I64, _LEN = 0, 1, 2


def check_public_context(data: bytes, params: EncryptionParameters) -> None:
    """Check that ``data`` is a TenSEAL context holding exactly ``params`` and no key.

    Cheap and allocation-bounded: a protobuf reader for the four fields of
    ``TenSEALContextProto`` and the two of ``TenSEALPublicProto`` TenSEAL writes for a
    parameters-only context (automatic-operation flags and the default scale), and a
    reader of SEAL's ``EncryptionParameters`` decompressed to at most a few KiB.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError("context must be bytes")
    if len(data) > MAX_CONTEXT_BYTES:
        raise FormatError(f"context of {len(data)} bytes exceeds the {MAX_CONTEXT_BYTES} limit")
    top = _proto_fields(bytes(data), {1: _LEN, 2: _LEN, 3: _LEN, 4: _VARINT}, "context")
    if 3 in top:
        raise SecurityError(
            "the uploaded context carries a secret key; send only the public context "
            "(Context.serialize(save_secret_key=False)) and keep the secret key on the client"
        )
    if top.get(4, 0) not in (0, 1):
        raise FormatError(f"context names an unknown encryption type {top[4]}")
    public = _proto_fields(top.get(2, b""), {1: _LEN, 2: _VARINT, 3: _I64, 4: _LEN, 5: _LEN},
                           "public context")
    keys = [name for field, name in ((1, "public"), (4, "relinearisation"), (5, "Galois"))
            if field in public]
    if keys:
        raise FormatError(f"the context carries {' and '.join(keys)} keys; it must hold the "
                          "parameters only (evaluation keys travel as items of their own)")
    if 1 not in top:
        raise FormatError("context holds no encryption parameters")
    _check_parms(top[1], params)


def _check_parms(blob: bytes, params: EncryptionParameters) -> None:
    """SEAL's ``EncryptionParameters`` serialisation: scheme (u8), N (u64), the number of
    primes (u64), each prime and then the plaintext modulus as a nested ``Modulus`` (SEAL
    header, u64 value)."""
    body = sealbytes.unwrap(blob, _MAX_PARMS_BYTES, "encryption parameters")
    modulus = struct.Struct("<16sQ")
    try:
        scheme, degree, count = struct.unpack_from("<BQQ", body)
        if count > 64 or len(body) != 17 + modulus.size * (count + 1):
            raise FormatError("malformed encryption parameters in the context")
        values = [modulus.unpack_from(body, 17 + modulus.size * i)[1] for i in range(count + 1)]
    except struct.error as exc:
        raise FormatError("malformed encryption parameters in the context") from exc
    names = {v: k.upper() for k, v in _SCHEMES.items()}
    if scheme != _SCHEMES[params.scheme]:
        raise ParameterError(f"context is a {names.get(scheme, f'scheme-{scheme}')} context, "
                             f"the model needs {params.scheme.upper()}")
    if degree != params.poly_modulus_degree:
        raise ParameterError(f"context has N={degree}, the model needs "
                             f"N={params.poly_modulus_degree}")
    if tuple(values[:-1]) != params.primes:
        raise ParameterError("context coefficient modulus differs from the model's parameters")
    if values[-1] != (params.plain_modulus if params.scheme == "bfv" else 0):
        raise ParameterError("context plaintext modulus differs from the model's parameters")


def _proto_fields(data: bytes, allowed: dict[int, int], what: str) -> dict[int, Any]:
    """The fields of one protobuf message: ``allowed`` maps field numbers to wire types.
    Unknown fields, other wire types, repeated fields and truncation are refused."""
    fields: dict[int, Any] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos, what)
        number, wire_type = tag >> 3, tag & 7
        if allowed.get(number) != wire_type or number in fields:
            raise FormatError(f"{what} is not a TenSEAL context (unexpected field {number}, "
                              f"wire type {wire_type})")
        if wire_type == _VARINT:
            value, pos = _varint(data, pos, what)
        else:
            length, pos = _varint(data, pos, what) if wire_type == _LEN else (8, pos)
            if pos + length > len(data):
                raise FormatError(f"{what} is truncated")
            value, pos = data[pos:pos + length], pos + length
        fields[number] = value
    return fields


def _varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise FormatError(f"{what} is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise FormatError(f"{what} holds a malformed integer")


@functools.lru_cache(maxsize=16)
def _parameters_only_context(params: EncryptionParameters) -> bytes:
    """TenSEAL's serialisation of a context holding ``params`` and no key, written here
    from SEAL's own ``EncryptionParameters`` (no key is generated)."""
    parms = sealapi.EncryptionParameters(
        sealapi.SCHEME_TYPE.BFV if params.scheme == "bfv" else sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus([sealapi.Modulus(q) for q in params.primes])
    if params.scheme == "bfv":
        parms.set_plain_modulus(sealapi.Modulus(params.plain_modulus))
    with tempfile.TemporaryDirectory(prefix="she-") as tmp:
        path = os.path.join(tmp, "parms")
        parms.save(path)
        blob = Path(path).read_bytes()
    return bytes([1 << 3 | _LEN]) + _varint_bytes(len(blob)) + blob


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def galois_elements(steps: list[int], poly_modulus_degree: int,
                    conjugate: bool = False) -> list[int]:
    """SEAL's Galois elements for left rotations by ``steps`` (generator 3 modulo 2N), and
    with ``conjugate`` the complex conjugation's (``2N - 1``) after them."""
    return ([pow(3, step, 2 * poly_modulus_degree) for step in steps]
            + ([2 * poly_modulus_degree - 1] if conjugate else []))


def relin_key_bytes(ctx: ts.Context) -> bytes:
    """Relinearisation keys in SEAL's seeded serialisation (needs the secret key)."""
    return _save_serializable(ctx, lambda keygen: keygen.create_relin_keys())


def galois_key_bytes(ctx: ts.Context, steps: list[int], conjugate: bool = False) -> bytes:
    """Galois keys for exactly ``steps`` and, with ``conjugate``, the complex conjugation
    (SEAL's seeded serialisation; needs the secret key)."""
    n = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
    elements = galois_elements(steps, n, conjugate)
    return _save_serializable(ctx, lambda keygen: keygen.create_galois_keys(elements))


def _save_serializable(ctx: ts.Context, create: Callable[[sealapi.KeyGenerator], Any]) -> bytes:
    keygen = sealapi.KeyGenerator(ctx.seal_context().data, ctx.secret_key().data)
    bridge = SealBridge(ctx)
    try:
        return bridge.save_serializable(create(keygen))
    finally:
        bridge.close()


def public_key_bytes(ctx: ts.Context) -> bytes:
    """The context's public key in SEAL's serialisation (TenSEAL's bindings offer no seeded
    form for it). The server re-randomises its results with it (:mod:`she.runtime.privacy`)."""
    bridge = SealBridge(ctx)
    try:
        return bridge.save_serializable(ctx.public_key().data)
    finally:
        bridge.close()


def load_public_key(ctx: ts.Context, data: bytes) -> sealapi.PublicKey:
    """Load an uploaded public key: its size, parameters and coefficients are checked
    (:func:`she.io.sealbytes.parse`, bounded decompression) before SEAL sees it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError("the public key is not in SEAL's serialised format")
    sealbytes.parse(bytes(data), key_level(ctx))
    return _seal_load(ctx, bytes(data), sealapi.PublicKey(), "public")


def load_relin_keys(ctx: ts.Context, data: bytes) -> sealapi.RelinKeys:
    """Load uploaded relinearisation keys: exactly one key (for ``s^2``) of the size
    ``ctx``'s parameters give, checked before SEAL loads it."""
    return _load_keys(ctx, data, sealapi.RelinKeys(), "relinearisation", 1, {0: "s^2"})


def load_galois_keys(ctx: ts.Context, data: bytes, steps: list[int],
                     conjugate: bool = False) -> sealapi.GaloisKeys:
    """Load uploaded Galois keys: exactly the keys for ``steps`` (and with ``conjugate``
    the complex conjugation), no other, checked before SEAL loads them."""
    n = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
    labels = [f"rotation step {s}" for s in steps] + (["conjugation"] if conjugate else [])
    # SEAL keeps one entry per Galois element g (odd, below 2N), at index g // 2.
    wanted = {elt >> 1: label for label, elt in zip(labels, galois_elements(steps, n, conjugate),
                                                   strict=True)}
    return _load_keys(ctx, data, sealapi.GaloisKeys(), "Galois", n, wanted)


def key_level(ctx: ts.Context) -> sealbytes.LevelSpec:
    """The shape of a key's ciphertexts: every prime (the special one included), NTT form."""
    data = ctx.seal_context().data.key_context_data()
    parms = data.parms()
    return sealbytes.LevelSpec(tuple(data.parms_id()), tuple(m.value() for m in parms.coeff_modulus()),
                               parms.poly_modulus_degree(), ntt_form=True)


def _load_keys(ctx: ts.Context, data: bytes, keys: KeysT, what: str, entries: int,
               wanted: dict[int, str]) -> KeysT:
    """``keys.load`` from ``data`` once its layout is known to be exactly the ``wanted``
    entries (index -> label) of ``entries``: the body is never decompressed past the size
    those keys have, every key is checked as a ciphertext, then SEAL validates the keys
    against ``ctx``."""
    if not isinstance(data, bytes | bytearray | memoryview) or bytes(data[:2]) != _SEAL_MAGIC:
        raise FormatError(f"{what} keys are not in SEAL's serialised format")
    level = key_level(ctx)
    expected = sealbytes.switching_keys_size(level, entries, len(wanted))
    body = sealbytes.unwrap(bytes(data), expected, f"{what} keys")
    filled = set(sealbytes.switching_key_entries(body, level, entries, what))
    # A key beyond the wanted ones cannot be there: the body would be larger than expected.
    missing = [label for index, label in wanted.items() if index not in filled]
    if missing:
        raise FormatError(f"{what} keys for {', '.join(missing)} are missing")
    return _seal_load(ctx, sealbytes.wrap(body), keys, what)


def _seal_load(ctx: ts.Context, data: bytes, keys: KeysT, what: str) -> KeysT:
    """``keys.load`` from checked bytes ``data``; SEAL validates them against ``ctx``."""
    bridge = SealBridge(ctx)
    try:
        Path(bridge.unit_path(0)).write_bytes(data)
        del data
        keys.load(ctx.seal_context().data, bridge.unit_path(0))
    except Exception as exc:  # SEAL raises ValueError / RuntimeError on invalid keys
        raise FormatError(f"{what} keys do not load for these parameters: {exc}") from exc
    finally:
        bridge.close()
    return keys


def level_specs(ctx: ts.Context) -> dict[int, sealbytes.LevelSpec]:
    """The valid ciphertext shape at every level, keyed by its number of RNS limbs."""
    specs = {}
    data = ctx.seal_context().data.first_context_data()
    while data is not None:
        parms = data.parms()
        moduli = tuple(m.value() for m in parms.coeff_modulus())
        specs[len(moduli)] = sealbytes.LevelSpec(  # SEAL keeps CKKS in NTT form, BFV not
            tuple(data.parms_id()), moduli, parms.poly_modulus_degree(),
            ntt_form=parms.scheme().name == "CKKS"
        )
        data = data.next_context_data()
    return specs


_SCRATCH = re.compile(r"she-(\d+)-")


def remove_orphaned_scratch(root: Path) -> int:
    """Remove the scratch directories (``she-<pid>-*``, in memory under /dev/shm) that
    processes killed before their cleanup left behind: those of this user whose process no
    longer exists. Returns how many were removed."""
    removed = 0
    for entry in root.glob("she-*"):
        match = _SCRATCH.match(entry.name)
        try:
            if not match or entry.is_symlink() or not entry.is_dir() \
                    or entry.stat().st_uid != os.getuid():
                continue
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:  # its process is gone
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        except (OSError, ValueError):  # alive (or not ours to ask about), or vanished
            continue
    return removed


class SealBridge:
    """Moves ciphertexts between numpy (:class:`~she.io.sealbytes.RawCiphertext`) and SEAL."""

    def __init__(self, ctx: ts.Context) -> None:
        self.ctx = ctx
        self.seal = ctx.seal_context().data
        self.levels = level_specs(ctx)
        shm = Path("/dev/shm")
        root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
        remove_orphaned_scratch(root)
        self._dir = Path(tempfile.mkdtemp(prefix=f"she-{os.getpid()}-", dir=root))
        self._path = str(self._dir / "ct")

    def unit_path(self, index: int | str) -> str:
        """A scratch file path private to this bridge."""
        return str(self._dir / f"u{index}")

    def to_seal(self, raw: sealbytes.RawCiphertext) -> sealapi.Ciphertext:
        return self.load(sealbytes.serialize(raw))

    def load(self, blob: bytes) -> sealapi.Ciphertext:
        """A SEAL ciphertext from its serialisation (validate it with
        :func:`she.io.sealbytes.parse` first; SEAL expands a seeded one)."""
        Path(self._path).write_bytes(blob)
        ct = sealapi.Ciphertext(self.seal)
        ct.load(self.seal, self._path)
        return ct

    def save_serializable(self, obj: Any) -> bytes:
        """The bytes SEAL writes for ``obj`` (a ciphertext, keys or a seeded Serializable)."""
        obj.save(self._path)
        return Path(self._path).read_bytes()

    def from_seal(self, ct: sealapi.Ciphertext) -> sealbytes.RawCiphertext:
        return sealbytes.parse(self.save_serializable(ct), self.levels[ct.coeff_modulus_size()],
                               size=ct.size())

    def transform(self, poly: np.ndarray, *, to_ntt: bool) -> np.ndarray:
        """One polynomial (``(L, N)`` residues at the level with ``L`` primes) moved into
        (``to_ntt``) or out of SEAL's NTT form."""
        level = self.levels[poly.shape[0]]
        # The second polynomial only rides along: SEAL refuses a ciphertext whose second
        # polynomial is zero (transparent), so it is all ones.
        ct = self.to_seal(sealbytes.RawCiphertext(np.stack([poly, np.ones_like(poly)]), 1.0,
                                                  level.parms_id, ntt_form=not to_ntt))
        evaluator = sealapi.Evaluator(self.seal)
        if to_ntt:
            evaluator.transform_to_ntt_inplace(ct)
        else:
            evaluator.transform_from_ntt_inplace(ct)
        out_level = dataclasses.replace(level, ntt_form=to_ntt)
        return sealbytes.parse(self.save_serializable(ct), out_level).data[0]

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:
        self.close()
