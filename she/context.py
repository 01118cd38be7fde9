"""TenSEAL contexts: creating them, exporting the public part, and checking uploads.

Keys are generated and held by TenSEAL/SEAL only. The client creates a context that
carries the secret key; what it sends is :func:`public_context_bytes` (the parameters, no
key at all) with :func:`relin_key_bytes` and, for single packing, :func:`galois_key_bytes`
(evaluation keys in SEAL's seeded form, half the size of their expanded form). A server
accepts a context through :func:`load_public_context`, which refuses one that carries a
secret key or whose parameters differ from the plan's, and the keys through
:func:`load_relin_keys` and :func:`load_galois_keys`.

This module also moves ciphertexts between SEAL objects and the numpy arrays the engine
computes on (:class:`SealBridge`): SEAL's Python bindings load and save ciphertexts
through files only, so the bridge uses a private directory in shared memory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from . import sealbytes
from .errors import FormatError, ParameterError, SecurityError
from .params import EncryptionParameters

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
    """Load an uploaded context for evaluation, refusing secret keys and foreign parameters."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError("context must be bytes")
    if len(data) > MAX_CONTEXT_BYTES:
        raise FormatError(f"context of {len(data)} bytes exceeds the {MAX_CONTEXT_BYTES} limit")
    try:
        ctx = ts.context_from(bytes(data))
    except Exception as exc:  # TenSEAL raises ValueError / RuntimeError on garbage
        raise FormatError(f"not a TenSEAL context: {exc}") from exc
    if ctx.has_secret_key():
        raise SecurityError(
            "the uploaded context carries a secret key; send only the public context "
            "(Context.serialize(save_secret_key=False)) and keep the secret key on the client"
        )
    check_matches(ctx, params)
    return ctx


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
    form for it). The server re-randomises its results with it (:mod:`she.privacy`)."""
    bridge = SealBridge(ctx)
    try:
        return bridge.save_serializable(ctx.public_key().data)
    finally:
        bridge.close()


def key_level(ctx: ts.Context) -> sealbytes.LevelSpec:
    """The shape of a public key: a ciphertext over every prime, special prime included."""
    data = ctx.seal_context().data.key_context_data()
    moduli = tuple(m.value() for m in data.parms().coeff_modulus())
    return sealbytes.LevelSpec(tuple(data.parms_id()), moduli,
                               data.parms().poly_modulus_degree(), ntt_form=True)


def load_public_key(ctx: ts.Context, data: bytes) -> sealapi.PublicKey:
    """Load an uploaded public key: its size, parameters and coefficients are checked
    (:func:`she.sealbytes.parse`, bounded decompression) before SEAL sees it."""
    sealbytes.parse(bytes(data), key_level(ctx))
    return _load_keys(ctx, data, sealapi.PublicKey(), "public")


def load_relin_keys(ctx: ts.Context, data: bytes) -> sealapi.RelinKeys:
    """Load uploaded relinearisation keys, checked by SEAL against ``ctx``'s parameters."""
    return _load_keys(ctx, data, sealapi.RelinKeys(), "relinearisation")


def load_galois_keys(ctx: ts.Context, data: bytes, steps: list[int],
                     conjugate: bool = False) -> sealapi.GaloisKeys:
    """Load uploaded Galois keys, checking SEAL's validity and that ``steps`` (and with
    ``conjugate`` the complex conjugation) are covered."""
    n = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
    keys = _load_keys(ctx, data, sealapi.GaloisKeys(), "Galois")
    labels = [str(s) for s in steps] + (["conjugation"] if conjugate else [])
    missing = [label for label, elt in zip(labels, galois_elements(steps, n, conjugate),
                                           strict=True) if not keys.has_key(elt)]
    if missing:
        raise FormatError(f"Galois keys for rotation steps {', '.join(missing)} are missing")
    return keys


def _load_keys(ctx: ts.Context, data: bytes, keys: KeysT, what: str) -> KeysT:
    """``keys.load`` from ``data`` (SEAL validates the keys against ``ctx``)."""
    if bytes(data[:2]) != _SEAL_MAGIC:
        raise FormatError(f"{what} keys are not in SEAL's serialised format")
    bridge = SealBridge(ctx)
    try:
        Path(bridge.unit_path(0)).write_bytes(data)
        keys.load(ctx.seal_context().data, bridge.unit_path(0))
    except Exception as exc:  # SEAL raises ValueError / RuntimeError on malformed keys
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


class SealBridge:
    """Moves ciphertexts between numpy (:class:`~she.sealbytes.RawCiphertext`) and SEAL."""

    def __init__(self, ctx: ts.Context) -> None:
        self.ctx = ctx
        self.seal = ctx.seal_context().data
        self.levels = level_specs(ctx)
        shm = Path("/dev/shm")
        root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self._dir = Path(tempfile.mkdtemp(prefix="she-", dir=root))
        self._path = str(self._dir / "ct")

    def unit_path(self, index: int | str) -> str:
        """A scratch file path private to this bridge."""
        return str(self._dir / f"u{index}")

    def to_seal(self, raw: sealbytes.RawCiphertext) -> sealapi.Ciphertext:
        return self.load(sealbytes.serialize(raw))

    def load(self, blob: bytes) -> sealapi.Ciphertext:
        """A SEAL ciphertext from its serialisation (validate it with
        :func:`she.sealbytes.parse` first; SEAL expands a seeded one)."""
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
