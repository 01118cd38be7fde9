"""BFV plans: an integer-quantised model that the encrypted run reproduces exactly.

The quantised model works on integers only::

    x_int = round(x * S_0)                                   (the client, |x_int| bounded)
    y_k   = W_k x_k + B_k      W_k = round(W * 2^f_k), B_k = round(b * S_k * 2^f_k)
    x_k+1 = y_k * y_k          scale S_k+1 = (S_k * 2^f_k)^2
    logits = y_K / (S_K * 2^f_K)

Every value it produces is bounded by interval arithmetic over the declared input range
(sound for every input in that range, not just the calibration samples), and the
plaintext modulus ``t`` is the smallest batching prime above twice the largest bound, so
nothing ever wraps modulo ``t``: the decrypted integers equal :func:`run_integers`
exactly. A model whose values need more than SEAL's 60-bit ``t`` is refused, naming the
layer. The ciphertext modulus follows a noise-budget model measured on SEAL (see
:func:`noise_bits`), with :data:`NOISE_MARGIN_BITS` to spare.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ParameterError
from ..frontend.lowering import Chain
from .params import (
    MAX_MODULUS_BITS,
    MAX_PLAIN_MODULUS_BITS,
    RING_SIZES,
    EncryptionParameters,
    batching_prime,
)

#: Default bits of the quantised inputs (magnitude) and weights (signed).
INPUT_BITS = 8
WEIGHT_BITS = 8
#: Noise budget (bits) left over at decryption.
NOISE_MARGIN_BITS = 12
#: Measured on SEAL 4 (TenSEAL 0.3): a fresh symmetric encryption has
#: ``log2(q) - log2(t) - 5`` bits of budget; a square with relinearisation consumes about
#: ``log2(t) + log2(N)/2 + 6`` bits (42-43 for t = 2^30, 63 for t = 2^50, N = 8192/16384).
FRESH_NOISE_BITS = 5
SQUARE_EXTRA_BITS = 8


def quantise_layer(matrix: np.ndarray, weight_bits: int) -> tuple[np.ndarray, int]:
    """``(W_int, f)`` with ``W ~= W_int * 2^-f`` and ``|W_int| < 2^(weight_bits - 1)``."""
    amax = float(np.abs(matrix).max(initial=0.0))
    if amax == 0.0:
        return np.zeros(matrix.shape, dtype=np.int64), 0
    f = weight_bits - 2 - math.floor(math.log2(amax))
    return np.round(matrix * 2.0 ** f).astype(np.int64), f


def integer_bounds(weights: list[np.ndarray], biases: list[np.ndarray],
                   input_range: tuple[int, int]) -> list[np.ndarray]:
    """Sound bounds on ``|y_k|`` of every unit of every layer for integer inputs in
    ``input_range`` (interval arithmetic, float64 with a relative safety margin)."""
    lo_in, hi_in = input_range
    n_in = weights[0].shape[1]
    low, high = np.full(n_in, float(lo_in)), np.full(n_in, float(hi_in))
    bounds = []
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if k:
            sq_lo = np.where((low <= 0) & (high >= 0), 0.0, np.minimum(low * low, high * high))
            low, high = sq_lo, np.maximum(low * low, high * high)
        centre, radius = (low + high) / 2, (high - low) / 2
        wf = w.astype(np.float64)
        mid = wf @ centre + b.astype(np.float64)
        rad = np.abs(wf) @ radius
        low, high = mid - rad, mid + rad
        bounds.append(np.maximum(np.abs(low), np.abs(high)) * (1 + 1e-9) + 1)
    return bounds


def noise_bits(plain_bits: int, poly_modulus_degree: int, weights: list[np.ndarray]) -> int:
    """Ciphertext-modulus bits the plan's noise needs, margin included."""
    bits = plain_bits + FRESH_NOISE_BITS + NOISE_MARGIN_BITS
    for k, w in enumerate(weights):
        row_mass = float(np.abs(w).sum(axis=1).max(initial=1))
        bits += math.ceil(math.log2(max(row_mass, 1.0))) + 1
        if k < len(weights) - 1:
            bits += plain_bits + math.ceil(math.log2(poly_modulus_degree) / 2) + SQUARE_EXTRA_BITS
    return bits


def plan_parameters(chain: Chain, input_range: tuple[float, float], *, input_bits: int,
                    weight_bits: int, security: int, poly_modulus_degree: int | None,
                    max_prime_bits: int) -> dict:
    """Quantise ``chain`` and choose BFV parameters for it.

    Returns a dict with ``input_scale``, ``input_int_range``, ``weights``, ``shifts``,
    ``biases``, ``scales`` (per layer output), ``bounds`` and ``params``.
    """
    if not 1 <= input_bits <= 24:
        raise ParameterError(f"input_bits={input_bits} is outside the supported range 1..24")
    if not 2 <= weight_bits <= 20:
        raise ParameterError(f"weight_bits={weight_bits} is outside the supported range 2..20")
    lo, hi = input_range
    magnitude = max(abs(lo), abs(hi))
    if magnitude == 0:
        raise ParameterError("the model's declared input range is empty")
    input_scale = (2 ** input_bits - 1) / magnitude
    int_range = (math.floor(lo * input_scale + 0.5), math.floor(hi * input_scale + 0.5))
    weights, shifts, biases, scales = [], [], [], []
    scale = input_scale
    for k, layer in enumerate(chain.layers):
        w_int, f = quantise_layer(layer.matrix, weight_bits)
        scale *= 2.0 ** f
        if scale >= 2.0 ** 62:
            raise ParameterError(f"BFV: the integer scale of layer {k}'s outputs exceeds 2^62; "
                                 "lower input_bits or weight_bits, or use CKKS")
        weights.append(w_int)
        shifts.append(f)
        biases.append(np.round(layer.bias * scale).astype(np.int64))
        scales.append(scale)
        scale = scale * scale
    bounds = integer_bounds(weights, biases, int_range)
    largest = 0.0
    for k, bound in enumerate(bounds):
        # The ciphertexts hold y_k and, for inner layers, y_k^2.
        held = float(bound.max(initial=1.0)) ** (2 if k < len(bounds) - 1 else 1)
        bits = math.ceil(math.log2(2 * held + 2))
        if bits > MAX_PLAIN_MODULUS_BITS:
            what = f"the square of layer {k}'s outputs" if k < len(bounds) - 1 else \
                f"layer {k}'s outputs"
            raise ParameterError(
                f"BFV cannot hold this model exactly: {what} can reach about 2^{math.log2(held):.0f} "
                f"for inputs in the declared range, more than a {MAX_PLAIN_MODULUS_BITS}-bit plaintext "
                f"modulus allows (input_bits={input_bits}, weight_bits={weight_bits}). Lower "
                f"input_bits or weight_bits, use a shallower model, or use CKKS"
            )
        largest = max(largest, held)
    plain_bits = max(math.ceil(math.log2(2 * largest + 2)) + 1, 17)
    params = _choose_ring(plain_bits, weights, security, poly_modulus_degree, max_prime_bits)
    return {"input_scale": input_scale, "input_int_range": int_range, "weights": weights,
            "shifts": shifts, "biases": biases, "scales": scales, "bounds": bounds,
            "params": params}


def _choose_ring(plain_bits: int, weights: list[np.ndarray], security: int,
                 poly_modulus_degree: int | None, max_prime_bits: int) -> EncryptionParameters:
    rings = (poly_modulus_degree,) if poly_modulus_degree else RING_SIZES
    for n in rings:
        q_bits = noise_bits(plain_bits, n, weights)
        count = math.ceil(q_bits / max_prime_bits)
        base, extra = divmod(q_bits, count)
        ct_bits = [base + (1 if i < extra else 0) for i in range(count)]
        modulus = ct_bits + [max(ct_bits)]
        if sum(modulus) > MAX_MODULUS_BITS.get(security, {}).get(n, 0):
            continue
        return EncryptionParameters("bfv", n, tuple(modulus), security,
                                    plain_modulus=batching_prime(plain_bits, n))
    where = f"N={poly_modulus_degree}" if poly_modulus_degree else "any ring size"
    raise ParameterError(
        f"BFV: a {plain_bits}-bit plaintext modulus and this model's noise need more "
        f"ciphertext modulus than {where} "
        f"allows at {security}-bit security; lower input_bits or weight_bits, or use CKKS"
    )


def quantise_inputs(x: np.ndarray, scale: float, int_range: tuple[int, int]) -> np.ndarray:
    """``round(x * scale)`` as int64, refused outside ``int_range`` (the range the plaintext
    modulus was sized for: beyond it the result could wrap modulo ``t``)."""
    x_int = np.floor(np.asarray(x, dtype=np.float64) * scale + 0.5)
    lo, hi = int_range
    if x_int.size and (x_int.min() < lo or x_int.max() > hi):
        raise ParameterError(
            f"inputs outside the model's declared input range [{lo / scale:g}, {hi / scale:g}]: "
            "BFV's plaintext modulus was sized for that range, so the result would be wrong"
        )
    return x_int.astype(np.int64)


def run_integers(weights: list[np.ndarray], biases: list[np.ndarray],
                 x_int: np.ndarray) -> np.ndarray:
    """The quantised model on integer inputs ``(batch, n_in)``: exact int64 arithmetic
    (the compiler's bounds keep every value below 2^61)."""
    h = np.asarray(x_int, dtype=np.int64)
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if k:
            h = h * h
        h = h @ w.T + b
    return h
