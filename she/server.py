"""The server: holds a model and computes on ciphertexts it cannot read.

A :class:`Server` turns bytes into bytes. It accepts a client's public context through
:meth:`Server.load_context` (refused if it carries a secret key or other parameters) and
then evaluates ciphertext messages with :meth:`Server.evaluate`. Every byte it receives is
checked before use: message framing, sizes, parameters, levels, scales, and coefficients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenseal as ts
import tenseal.sealapi as sealapi

from .errors import FormatError
from .frontend.model import load
from .io import compact, sealbytes, wire
from .io.context import (
    SealBridge,
    galois_elements,
    level_specs,
    load_galois_keys,
    load_public_context,
    load_public_key,
    load_relin_keys,
    new_secret_context,
)
from .plan.compiler import Plan, compile
from .runtime.engine import Engine
from .runtime.privacy import Rerandomiser
from .runtime.single import SingleEngine

#: SEAL's refusal to produce a ciphertext whose second polynomial is zero (no encryption).
_SEAL_TRANSPARENT = "result ciphertext is transparent"


@contextlib.contextmanager
def _transparent_is_bad_input() -> Iterator[None]:
    """Turn SEAL's "transparent result" error during an evaluation into a
    :class:`FormatError`: inputs that are valid ciphertexts one by one can still cancel
    out inside the model (the same ciphertext for every pixel, and a filter whose weights
    sum to zero), which fresh independent encryptions never do. (A unit whose weights are
    all zero never gets here: the compiler folds it into its readers' biases, see
    :func:`~she.plan.compiler.fold_constant_units`.)"""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        if _SEAL_TRANSPARENT not in str(exc):
            raise
        raise FormatError("a ciphertext became transparent inside the model: the input "
                          "ciphertexts cancel out (send fresh, independent encryptions)") from None


@dataclass
class EvaluationKeys:
    """A client's public context, checked against the server's plan."""

    ctx: ts.Context
    fingerprint: str
    relin: sealapi.RelinKeys = field(repr=False)
    galois: sealapi.GaloisKeys | None = field(default=None, repr=False)
    #: The client's public key: every result is re-randomised with it (:mod:`she.runtime.privacy`).
    public: sealapi.PublicKey | None = field(default=None, repr=False)


class Server:
    """Evaluates one compiled model for any number of clients.

    ``workers`` is the number of processes used for the SEAL operations (default: all cores).
    """

    def __init__(self, plan: Plan, workers: int | None = None) -> None:
        self.plan = plan
        self.engine: Engine | SingleEngine = (
            Engine(plan, workers) if plan.packing == "batch" else SingleEngine(plan, workers))
        self.fingerprint = plan.params.fingerprint()
        self._top_limbs = len(plan.params.ciphertext_primes)
        raw = 16 + 8 * 2 * self._top_limbs * plan.params.poly_modulus_degree + 128
        #: Largest acceptable input ciphertext (a compressed body is never much larger; a
        #: compact one has exactly its size).
        self.max_item_bytes = (raw + 1024 if plan.packing == "batch" else
                               compact.packed_size(plan.params.ciphertext_primes,
                                                   plan.params.poly_modulus_degree,
                                                   plan.input_drop_bits))
        #: Largest acceptable request message.
        self.max_request_bytes = (plan.input_ciphertexts * (self.max_item_bytes + 8)
                                  + wire.MAX_META_BYTES + 64)

    @property
    def session_key_bytes(self) -> int:
        """Memory one session's keys hold on this server (:func:`session_key_bytes`)."""
        return session_key_bytes(self.plan)

    def prepare(self) -> None:
        """Do once, before serving, the work the first request would otherwise do in every
        forked worker (single packing: encoding the weights' diagonals)."""
        if isinstance(self.engine, SingleEngine):
            self.engine._encode_diagonals(new_secret_context(self.plan.params)
                                          .seal_context().data)

    def use_processes(self, processes: int) -> None:
        """Let one evaluation use at most ``processes`` processes (a forked request worker
        sets its share of the budget, see :mod:`she.serve.workers`)."""
        self.engine.workers = max(1, processes)
        if isinstance(self.engine, SingleEngine) and processes < 2:
            self.engine.split = [0] * len(self.engine.split)

    @classmethod
    def from_model(cls, path: str | Path, **compile_options: Any) -> Server:
        """Load an HE-friendly ONNX model and compile it (see :func:`she.compile`)."""
        return cls(compile(load(path), **compile_options))

    @property
    def spec(self) -> dict[str, Any]:
        """The public model spec clients need, with what a session costs the server and
        the privacy of its results."""
        return {**self.plan.spec(), "session_key_bytes": self.session_key_bytes,
                "predicted_error": self.plan.predicted_error,
                "rerandomised": True, "circuit_privacy_bits": self.plan.circuit_privacy}

    def load_context(self, data: bytes) -> EvaluationKeys:
        """Accept a client's public context message."""
        steps = self.plan.rotation_steps()
        single = self.plan.packing == "single"  # Galois keys: rotations and conjugation
        msg = wire.unpack(data, kind=wire.KIND_CONTEXT, max_items=4,
                          max_item_bytes=len(data))
        if msg.meta.get("fingerprint") != self.fingerprint:
            raise FormatError("context was made for other encryption parameters")
        if msg.items:  # a context that carries a secret key is refused whatever follows it
            ctx = load_public_context(msg.items[0], self.plan.params)
        if len(msg.items) != 3 + single:
            raise FormatError(f"expected {3 + single} items (public context, "
                              f"relinearisation keys{', Galois keys' if single else ''}, "
                              f"public key), got {len(msg.items)}")
        relin = load_relin_keys(ctx, msg.items[1])
        galois = load_galois_keys(ctx, msg.items[2], steps, conjugate=True) if single else None
        public = load_public_key(ctx, msg.items[-1])
        return EvaluationKeys(ctx, self.fingerprint, relin, galois, public)

    def evaluate(self, keys: EvaluationKeys, data: bytes) -> bytes:
        """Run the model on a ciphertext message; returns the encrypted result message."""
        level = level_specs(keys.ctx)[self._top_limbs]
        n_in = self.plan.input_ciphertexts
        msg = wire.unpack(data, kind=wire.KIND_CIPHERTEXTS, max_items=n_in,
                          max_item_bytes=self.max_item_bytes)
        if msg.meta.get("fingerprint") != self.fingerprint:
            raise FormatError("ciphertexts were made for other encryption parameters")
        batch = wire.batch_size(msg.meta, self.plan.batch_capacity)
        if len(msg.items) != n_in:
            raise FormatError(f"expected {n_in} input ciphertexts, got {len(msg.items)}")
        if keys.public is None:
            raise FormatError("these evaluation keys carry no public key")
        if isinstance(self.engine, SingleEngine):
            results = [self._evaluate_single(keys, level, msg.items[0])]
        else:
            scale = self.plan.ciphertext_scale
            inputs = self.engine.parse_inputs(keys.ctx, msg.items, level, scale)
            msg.items.clear()
            with _transparent_is_bad_input():
                out, scale = self.engine.run(keys.ctx, keys.relin, inputs, scale)
            out_level = level_specs(keys.ctx)[out.shape[2]]
            results = [sealbytes.RawCiphertext(unit, scale, out_level.parms_id, out_level.ntt_form)
                       for unit in out]
        bridge = SealBridge(keys.ctx)
        try:  # every result leaves as a fresh encryption (and flooded, if the plan says so)
            rerandomise = Rerandomiser(bridge, keys.public, self.plan.flood_bits)
            items = [sealbytes.serialize(rerandomise(raw), compress=True) for raw in results]
        finally:
            bridge.close()
        meta = {"fingerprint": self.fingerprint, "batch": batch, "model": self.plan.model_name}
        return wire.pack(wire.KIND_CIPHERTEXTS, meta, items)

    def _evaluate_single(self, keys: EvaluationKeys, level: sealbytes.LevelSpec,
                         item: bytes) -> sealbytes.RawCiphertext:
        """Single packing: ``item`` is the compact input ciphertext (:mod:`she.io.compact`),
        rebuilt here into SEAL's seeded form, which SEAL expands, and unfolded: added to its
        conjugate."""
        if keys.galois is None:
            raise FormatError("these evaluation keys carry no Galois keys")
        assert isinstance(self.engine, SingleEngine)
        v, scale, seed_info = compact.unpack(item, level.moduli, level.poly_modulus_degree,
                                             self.plan.input_drop_bits)
        if scale != self.plan.input_scale:
            raise FormatError(f"input ciphertext 0 has scale {scale}, "
                              f"expected {self.plan.input_scale}")
        bridge = SealBridge(keys.ctx)
        try:
            ct = compact.unfold(bridge, level, v, scale, seed_info, keys.galois)
            with _transparent_is_bad_input():
                return bridge.from_seal(self.engine.run(keys.ctx, keys.relin, keys.galois, ct))
        finally:
            bridge.close()


def session_key_bytes(plan: Plan) -> int:
    """Memory one session's keys hold on a server: the relinearisation key, the Galois keys
    (single packing) and the public key, expanded. A key-switching key is one
    two-polynomial ciphertext over every prime per ciphertext prime."""
    params = plan.params
    poly = 8 * params.poly_modulus_degree * len(params.primes)
    switching = len(params.ciphertext_primes) * 2 * poly
    galois = (len(galois_elements(plan.rotation_steps(), params.poly_modulus_degree,
                                  conjugate=True)) if plan.packing == "single" else 0)
    return (1 + galois) * switching + 2 * poly
