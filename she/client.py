"""The client: holds the secret key, encrypts inputs and decrypts results.

The secret key never leaves this object except through :meth:`Client.save`, which writes
it to a local file chosen by the user.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .errors import FormatError, ParameterError
from .frontend import tail as tails
from .io import compact, sealbytes, wire
from .io.context import (
    SealBridge,
    check_matches,
    galois_key_bytes,
    level_specs,
    new_secret_context,
    public_context_bytes,
    public_key_bytes,
    relin_key_bytes,
)
from .io.privatefiles import write_private
from .plan import bfv
from .plan.layout import period, replicate
from .plan.params import EncryptionParameters

#: Largest accepted serialised ciphertext (bytes).
MAX_CIPHERTEXT_BYTES = 64 * 1024 * 1024
#: Most Galois keys a spec may ask the client to generate.
MAX_GALOIS_STEPS = 64


class Client:
    """Key owner for one model spec (see :meth:`she.plan.compiler.Plan.spec`)."""

    def __init__(self, spec: dict[str, Any], context: ts.Context | None = None) -> None:
        self.spec = dict(spec)
        self.params = EncryptionParameters.from_spec(spec)
        self.packing = self.spec.get("packing", "batch")
        if self.packing not in ("batch", "single") or (
                self.params.scheme == "bfv" and self.packing != "batch"):
            raise ParameterError(f"model spec has an unsupported packing {self.packing!r}")
        self._int_range = _input_int_range(self.spec) if self.params.scheme == "bfv" else None
        self.galois_steps = _galois_steps(self.spec, self.params.slots)
        self._replicas = _input_replicas(self.spec, self.params.slots)
        self._drop_bits = _input_drop_bits(self.spec) if self.packing == "single" else 0
        self.tail = tails.from_spec(self.spec)
        self._public: bytes | None = None
        if context is None:
            context = new_secret_context(self.params)
        else:
            check_matches(context, self.params)
        if not context.has_secret_key():
            raise ParameterError("a client context must hold the secret key")
        self.ctx = context
        self._seal = context.seal_context().data
        self._levels = level_specs(context)
        self._encoder = (sealapi.BatchEncoder(self._seal) if self.params.scheme == "bfv"
                         else sealapi.CKKSEncoder(self._seal))
        secret = context.secret_key().data
        self._encryptor = sealapi.Encryptor(self._seal, secret)
        self._decryptor = sealapi.Decryptor(self._seal, secret)
        self._bridge = SealBridge(context)

    @property
    def fingerprint(self) -> str:
        return self.params.fingerprint()

    def public_context(self) -> bytes:
        """What the server needs (no secret key): the parameters, the relinearisation keys,
        for single packing the Galois keys of the plan's rotations and of the conjugation
        that unfolds the compact upload, and last a public key, with which the server
        re-randomises every result (:mod:`she.runtime.privacy`). Made once."""
        if self._public is None:
            items = [public_context_bytes(self.ctx), relin_key_bytes(self.ctx)]
            if self.packing == "single":  # the rotations, and the conjugation that unfolds
                items.append(galois_key_bytes(self.ctx, self.galois_steps, conjugate=True))
            items.append(public_key_bytes(self.ctx))  # the server re-randomises with it
            meta = {"fingerprint": self.fingerprint, "model": self.spec.get("model")}
            self._public = wire.pack(wire.KIND_CONTEXT, meta, items)
        return self._public

    def encrypt(self, x: np.ndarray) -> bytes:
        """Encrypt a batch of samples: ``x`` has shape ``(batch, *input_shape)``.

        Single packing sends its one ciphertext in compact form (:mod:`she.io.compact`: half
        of the first polynomial's information, folded by conjugation and bit-packed with the
        spec's ``input_drop_bits`` rounded away, and the seed the second is drawn from).
        BFV quantises the inputs to integers first (refusing values outside the model's
        declared range).
        """
        shape = tuple(self.spec["input_shape"])
        x = np.asarray(x, dtype=np.float64)
        if x.shape[1:] != shape and x.shape != shape:
            raise ParameterError(f"inputs must have shape (batch, {', '.join(map(str, shape))}), "
                                 f"got {x.shape}")
        x = x.reshape(-1, int(np.prod(shape)))
        batch = x.shape[0]
        if not 1 <= batch <= int(self.spec["batch_capacity"]):
            raise ParameterError(f"batch of {batch} samples; this model takes 1 to "
                                 f"{self.spec['batch_capacity']} per request")
        if not np.all(np.isfinite(x)):
            raise ParameterError("inputs contain NaN or infinity")
        scale = float(self.spec["input_scale"])
        if self._int_range is not None:
            x = bfv.quantise_inputs(x, scale, self._int_range)
        columns = x.T if self.packing == "batch" else [
            replicate(x[0], self.params.slots, *self._replicas)]
        items = []
        for column in columns:
            plain = sealapi.Plaintext()
            if self._int_range is not None:
                self._encoder.encode(column.tolist(), plain)
            else:  # single packing: unfolding multiplies the values (see she.io.compact)
                gain = compact.FOLD_GAIN if self.packing == "single" else 1
                self._encoder.encode(column.tolist(), scale / gain, plain)
            if self.packing == "single":
                items.append(self._compact(self._encryptor.encrypt_symmetric(plain)))
            else:  # the server's kernels need both polynomials as coefficient arrays
                ct = sealapi.Ciphertext(self._seal)
                self._encryptor.encrypt_symmetric(plain, ct)
                items.append(self._bridge.save_serializable(ct))
        meta = {"fingerprint": self.fingerprint, "batch": batch, "model": self.spec.get("model")}
        return wire.pack(wire.KIND_CIPHERTEXTS, meta, items)

    def _compact(self, seeded: Any) -> bytes:
        """The compact form of a seeded fresh ciphertext (a SEAL ``Serializable``)."""
        level = self._levels[len(self.params.ciphertext_primes)]
        raw = sealbytes.parse(self._bridge.save_serializable(seeded), level, seeded=True)
        assert raw.seed_info is not None
        c0 = self._bridge.transform(raw.data[0], to_ntt=False)
        return compact.pack(c0, level.moduli, self._drop_bits, compact.FOLD_GAIN * raw.scale,
                            raw.seed_info)

    def decrypt(self, data: bytes) -> np.ndarray:
        """Decrypt a result message into the original model's output, shape
        ``(batch, output_size)``: the logits, or, when the converter moved a Softmax (or
        LogSoftmax) out of the encrypted part, the probabilities it gives."""
        logits = self.decrypt_logits(data)
        if self.tail is None:
            return logits
        return self.tail.evaluate(logits)[1]

    def decrypt_outputs(self, data: bytes) -> dict[str, Any]:
        """Every output of the original model, by name (``{"logits": ...}`` without a
        tail): the tail (:mod:`she.frontend.tail`) re-applied to the decrypted logits."""
        logits = self.decrypt_logits(data)
        return {"logits": logits} if self.tail is None else self.tail.run(logits)

    def decrypt_logits(self, data: bytes) -> np.ndarray:
        """The decrypted output of the encrypted part (before any plaintext tail)."""
        values = self.decrypt_raw(data)
        if self._int_range is not None:
            return values / float(self.spec["output_scale"])
        return values

    def decrypt_raw(self, data: bytes) -> np.ndarray:
        """The decrypted slot values: CKKS outputs (float64) or, in BFV, the quantised
        model's exact integer outputs (int64, at the spec's ``output_scale``)."""
        n_out = int(self.spec["output_ciphertexts"])
        msg = wire.unpack(data, kind=wire.KIND_CIPHERTEXTS, max_items=n_out,
                          max_item_bytes=MAX_CIPHERTEXT_BYTES)
        if msg.meta.get("fingerprint") != self.fingerprint:
            raise FormatError("result was computed for other encryption parameters")
        batch = wire.batch_size(msg.meta, int(self.spec["batch_capacity"]))
        if len(msg.items) != n_out:
            raise FormatError(f"expected {n_out} result ciphertexts, got {len(msg.items)}")
        level = self._levels.get(int(self.spec["output_limbs"]))
        if level is None:
            raise ParameterError("model spec names an output level its parameters do not have")
        n_values = n_out if self.packing == "batch" else int(self.spec["output_size"])
        bfv_scheme = self._int_range is not None
        out = np.empty((batch, n_values), dtype=np.int64 if bfv_scheme else np.float64)
        expected = 1.0 if bfv_scheme else float(self.spec["output_scale"])
        for j, blob in enumerate(msg.items):
            raw = sealbytes.parse(blob, level)
            if not math.isclose(raw.scale, expected, rel_tol=1e-9):
                raise FormatError(f"result ciphertext {j} has scale {raw.scale}, expected "
                                  f"{expected}")
            ct = self._bridge.to_seal(raw)
            plain = sealapi.Plaintext()
            self._decryptor.decrypt(ct, plain)
            values = np.asarray(self._encoder.decode_int64(plain) if bfv_scheme
                                else self._encoder.decode_double(plain))
            if self.packing == "batch":
                out[:, j] = values[:batch]
            else:
                out[0] = values[:n_values]
        return out

    # -- local persistence ----------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the secret context and the spec to a local file, created with mode 0600
        and renamed into place (never readable by others, never through a symbolic link;
        see :func:`she.io.privatefiles.write_private`)."""
        body = self.ctx.serialize(save_public_key=True, save_secret_key=True,
                                  save_galois_keys=False, save_relin_keys=True)
        meta = {"spec": self.spec, "fingerprint": self.fingerprint}
        write_private(path, wire.pack(wire.KIND_CONTEXT, meta, [body]))

    @classmethod
    def load(cls, path: str | Path) -> Client:
        """Read a client saved with :meth:`save`."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise FormatError(f"cannot read key file {path}: {exc}") from exc
        msg = wire.unpack(data, kind=wire.KIND_CONTEXT, max_items=1, max_item_bytes=len(data))
        if len(msg.items) != 1 or "spec" not in msg.meta:
            raise FormatError(f"{path} is not a SHE secret key file")
        try:
            ctx = ts.context_from(msg.items[0])
        except Exception as exc:
            raise FormatError(f"{path}: corrupt key file: {exc}") from exc
        return cls(msg.meta["spec"], ctx)

    def spec_json(self) -> str:
        return json.dumps(self.spec, indent=2)


def _galois_steps(spec: dict[str, Any], slots: int) -> list[int]:
    """The rotation steps a spec asks keys for, checked (a spec may come from a server)."""
    steps = spec.get("galois_steps", [])
    if not isinstance(steps, list) or len(steps) > MAX_GALOIS_STEPS or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 < s < slots for s in steps
    ):
        raise ParameterError(f"model spec has invalid galois_steps (at most {MAX_GALOIS_STEPS} "
                             f"integers in 1..{slots - 1})")
    return sorted(set(steps))



def _input_int_range(spec: dict[str, Any]) -> tuple[int, int]:
    """BFV's integer input range from a spec, checked."""
    bounds = spec.get("input_int_range")
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and abs(b) < 2 ** 24
                    for b in bounds) and bounds[0] <= bounds[1]):
        raise ParameterError(f"model spec has an invalid input_int_range {bounds!r}")
    scale = spec.get("input_scale")
    if not (isinstance(scale, float | int) and math.isfinite(scale) and scale > 0):
        raise ParameterError(f"model spec has an invalid input_scale {scale!r}")
    return bounds[0], bounds[1]


def _input_drop_bits(spec: dict[str, Any]) -> int:
    """The spec's ``input_drop_bits``, checked (a spec may come from a server)."""
    bits = spec.get("input_drop_bits", 0)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= compact.MAX_DROP_BITS:
        raise ParameterError(f"model spec has invalid input_drop_bits {bits!r} (expected an "
                             f"integer from 0 to {compact.MAX_DROP_BITS})")
    return bits


def _input_replicas(spec: dict[str, Any], slots: int) -> tuple[int, int]:
    """Single packing's ``(replicas, shift)`` input layout from a spec, checked."""
    replicas, shift = spec.get("input_replicas", 1), spec.get("input_shift", 0)
    p = period(int(np.prod(spec["input_shape"])))
    if not (isinstance(replicas, int) and isinstance(shift, int) and not isinstance(replicas, bool)
            and not isinstance(shift, bool) and replicas >= 1 and replicas & (replicas - 1) == 0
            and replicas * p <= slots and 0 <= shift < p):
        raise ParameterError(f"model spec has an invalid input layout (input_replicas {replicas!r}, "
                             f"input_shift {shift!r})")
    return replicas, shift
