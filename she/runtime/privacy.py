"""Model privacy of results: re-randomisation and noise flooding.

A result ciphertext computed by the server is a deterministic function of the client's
ciphertexts and the model; decrypted, it carries evaluation noise that depends on the
weights. Before a result leaves the server:

* **Re-randomisation** (always): a fresh public-key encryption of zero under the client's
  public key is added (SEAL's ``Encryptor.encrypt_zero``). The ciphertext is then a fresh
  random encryption of the same value: its two polynomials say nothing beyond what it
  decrypts to, provided the public key was honestly generated (the server refuses one
  with a zero polynomial, but cannot check that a key is well formed: a client that
  crafts its public key can read the result's polynomials). It does not hide the
  evaluation noise inside the decrypted value.
* **Noise flooding** (``circuit_privacy=s`` bits, CKKS): a uniformly random polynomial
  with coefficients in ``[-B, B)`` (drawn from the operating system's CSPRNG) is added to
  the first polynomial. With ``e`` the evaluation noise of all the output ciphertexts'
  coefficients, the decrypted result's distribution is within statistical distance
  ``||e||_1 / (2B)`` of one that does not depend on ``e``; :func:`flood_bits` chooses
  ``B = 2^(s-1) ||e||_1`` (the bound on ``||e||_1`` from the plan's predicted error), so the
  distance is at most ``2^-s``. The price is precision: the decrypted values gain an error
  of about ``SIGMAS * B * sqrt(N/3) / scale`` (:func:`flooding_error`), which the compiler
  adds to the plan's predicted error before it checks the argmax margin
  (:func:`budget_flooding`).

What neither hides: the result itself (a client learns the model's outputs on inputs of its
choice, so enough queries can approximate the model), and the weight quantisation error,
which is part of the function computed. CKKS decryptions must never go back to the server
(IND-CPA-D): a decrypted value minus the true output reveals noise that depends on the
secret key.
"""

from __future__ import annotations

import math
import os

import numpy as np
import tenseal.sealapi as sealapi

from ..errors import ParameterError
from ..io.context import SealBridge
from ..io.sealbytes import RawCiphertext
from ..plan.compiler import SIGMAS, Plan

#: Most flooding bits supported (noise is drawn as 64-bit integers).
MAX_FLOOD_BITS = 62


def flood_bits(plan: Plan, security_bits: int) -> int:
    """``log2 B`` of the flooding that hides the evaluation noise of ``plan``'s results to a
    statistical distance of ``2^-security_bits``; refused when the output level cannot
    hold it beside the outputs (:func:`flooding_headroom_bits` says how many bits short).
    """
    bits = _needed_bits(plan, security_bits)
    if bits > _room_bits(plan):
        raise ParameterError(f"noise flooding to 2^-{security_bits} needs {bits}-bit noise, "
                             f"more than the output level holds ({_room_bits(plan):.0f} bits)")
    return bits


def flooding_headroom_bits(plan: Plan, security_bits: int) -> int:
    """Bits the output primes of ``plan`` lack to hold the flooding to
    ``2^-security_bits`` (0 if they suffice); the compiler adds them."""
    return max(0, math.ceil(_needed_bits(plan, security_bits) + 1 - _room_bits(plan)))


def _needed_bits(plan: Plan, security_bits: int) -> int:
    """``log2 B`` for ``2^-security_bits``: ``B = 2^(s-1) ||e||_1``.

    The plan's predicted noise error (:attr:`~she.plan.compiler.Plan.noise_error`: its predicted
    error without the weight quantisation, which is no noise) is a 6-sigma
    (:data:`~she.plan.compiler.SIGMAS`) bound on the decrypted values; a slot sums ``N``
    coefficients with unit weights, so one output coefficient's noise has a standard
    deviation of at most ``err * scale / (SIGMAS sqrt(N))``, and the ``n N`` coefficients
    of ``n`` output ciphertexts have ``||e||_1 <= n sqrt(N) err scale / SIGMAS`` (the mean
    absolute value of a normal variable is 0.8 of its deviation; a sum of thousands stays
    below 1.0 of it).
    """
    if plan.scheme != "ckks":
        raise ParameterError("noise flooding is implemented for CKKS; BFV results are "
                             "re-randomised only")
    if not 0 <= security_bits <= 128:
        raise ParameterError(f"circuit privacy of {security_bits} bits is outside 0..128")
    noise = plan.predicted_error if plan.noise_error is None else plan.noise_error
    n = plan.params.poly_modulus_degree
    norm = plan.output_ciphertexts * math.sqrt(n) * noise * plan.output_scale() / SIGMAS
    bits = math.ceil(security_bits - 1 + math.log2(max(norm, 1.0)))
    if bits > MAX_FLOOD_BITS:
        raise ParameterError(f"noise flooding to 2^-{security_bits} needs {bits}-bit noise, "
                             f"more than the {MAX_FLOOD_BITS} bits supported")
    return bits


def _room_bits(plan: Plan) -> float:
    """``log2`` of the largest noise the output level holds beside the outputs (bounded
    by the last layer's value bound): the flooded values stay below an eighth of its
    modulus."""
    q_bits = sum(math.log2(q) for q in plan.params.ciphertext_primes[:plan.output_limbs])
    values = max(plan.layers[-1].value_bound, 1.0) * plan.output_scale()
    return math.log2(max(2.0 ** (q_bits - 3) - values, 1.0))


def flooding_error(plan: Plan, bits: int) -> float:
    """Error the flooding ``[-2^bits, 2^bits)`` adds to the decrypted outputs (6 sigma: a
    slot sums ``N`` coefficients of variance ``4^bits / 3``)."""
    return SIGMAS * 2.0 ** bits * math.sqrt(plan.params.poly_modulus_degree / 3) \
        / plan.output_scale()


def budget_flooding(plan: Plan, security_bits: int, outputs: np.ndarray | None) -> None:
    """Give ``plan`` noise flooding to ``2^-security_bits``: its flooding bound, and its
    predicted error raised by the flooding's; refused (:class:`ParameterError`) when that
    error could change the argmax of calibration samples (``outputs``: the float model's
    outputs for them)."""
    from ..plan.compiler import _check_argmax_margin

    plan.flood_bits = flood_bits(plan, security_bits)
    plan.circuit_privacy = security_bits
    plan.predicted_error += flooding_error(plan, plan.flood_bits)
    if outputs is not None:
        _check_argmax_margin(plan, outputs)


class Rerandomiser:
    """Re-randomises (and optionally floods) result ciphertexts under one public key."""

    def __init__(self, bridge: SealBridge, public_key: sealapi.PublicKey,
                 flood: int | None = None) -> None:
        self._bridge = bridge
        self._encryptor = sealapi.Encryptor(bridge.seal, public_key)
        self._flood = flood

    def __call__(self, raw: RawCiphertext) -> RawCiphertext:
        """``raw`` plus a fresh encryption of zero (and flooding noise), as a new array."""
        level = self._bridge.levels[raw.data.shape[1]]
        zero = sealapi.Ciphertext(self._bridge.seal)
        self._encryptor.encrypt_zero(list(level.parms_id), zero)
        mask = self._bridge.from_seal(zero).data
        q = np.asarray(level.moduli, dtype=np.uint64)[None, :, None]
        data = raw.data + mask  # both below q < 2^61: no overflow
        if self._flood is not None:
            noise = _uniform_noise(self._flood, level.moduli, level.poly_modulus_degree)
            if level.ntt_form:
                noise = self._bridge.transform(noise, to_ntt=True)
            data[0] += noise
        np.remainder(data, q, out=data)
        return RawCiphertext(data, raw.scale, raw.parms_id, raw.ntt_form)


def _uniform_noise(bits: int, moduli: tuple[int, ...], n: int) -> np.ndarray:
    """A polynomial with coefficients uniform in ``[-2^bits, 2^bits)`` from ``os.urandom``,
    as ``(limbs, n)`` residues (``bits`` <= 62 and every prime below 2^61: int64 holds it)."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    values = (raw & np.uint64((1 << (bits + 1)) - 1)).astype(np.int64) - np.int64(1 << bits)
    return np.stack([np.remainder(values, np.int64(q)).astype(np.uint64) for q in moduli])
