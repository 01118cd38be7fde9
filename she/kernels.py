"""The hot loop: exact integer linear combinations of ciphertexts.

A linear layer with integer weights maps ciphertexts ``c_k`` to ``sum_k W[o, k] * c_k``.
Both ciphertext polynomials are linear in the message, and SEAL keeps CKKS ciphertexts in
NTT form, where this combination is the same combination of the coefficient arrays, limb by
limb, modulo each RNS prime ``q``. So a whole layer is one matrix product per limb:
``W @ C_q mod q`` with ``C_q`` the ``(inputs, 2 * N)`` coefficient matrix of limb ``q``.

The product runs in float64 (BLAS, or scipy's sparse kernel for convolutions), which is
exact while every partial sum stays below 2^53: coefficients are centred to ``|c| <= q/2``
and, when a row's weight mass is too large for one product, the weights are split into
balanced base-``2^b`` digits and recombined with Horner's rule, reducing after each step.
The result is bit-exact against SEAL's evaluator (see ``tests/test_kernels.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import ParameterError

_EXACT = 2.0 ** 53
#: Use a sparse product below this weight density.
SPARSE_DENSITY = 0.25


@dataclass
class LinearKernel:
    """Precomputed digits of an integer weight matrix for one prime size."""

    digits: list[np.ndarray | sp.csr_matrix]  # most significant first, float64
    base_bits: int

    @classmethod
    def build(cls, weights: np.ndarray, max_prime: int) -> LinearKernel:
        """Prepare ``weights`` (int64, (n_out, n_in)) for primes up to ``max_prime``."""
        half = max_prime / 2
        row_mass = float(np.abs(weights).sum(axis=1).max(initial=0))
        if row_mass * half < _EXACT:
            parts, base = [weights], 0
        else:
            nnz = int(np.count_nonzero(weights, axis=1).max(initial=1))
            base = min(16, math.floor(52 - math.log2(half) - math.log2(nnz)))
            if base < 1:
                raise ParameterError(
                    f"a layer with {nnz} inputs per output is too wide for exact arithmetic "
                    f"with {max_prime.bit_length()}-bit primes"
                )
            parts = _balanced_digits(weights, base)
        density = np.count_nonzero(weights) / max(weights.size, 1)
        as_float = [p.astype(np.float64) for p in parts]
        if density < SPARSE_DENSITY:
            as_float = [sp.csr_matrix(p) for p in as_float]
        return cls(as_float, base)

    @property
    def n_out(self) -> int:
        """Output ciphertexts of the layer."""
        return int(self.digits[0].shape[0])

    def apply(self, data: np.ndarray, moduli: tuple[int, ...]) -> np.ndarray:
        """``W @ data mod q`` for every limb.

        ``data`` has shape ``(n_in, size, limbs, N)`` (uint64); returns
        ``(n_out, size, limbs, N)``.
        """
        n_in, size, limbs, degree = data.shape
        n_out = self.n_out
        out = np.empty((n_out, size, limbs, degree), dtype=np.uint64)
        shift = float(2 ** self.base_bits)
        # Every step works in place: on this kind of machine fresh temporaries (page faults)
        # cost more than the arithmetic.
        for j, q in enumerate(moduli):
            c = data[:, :, j, :].reshape(n_in, size * degree).astype(np.float64)
            np.subtract(c, q, out=c, where=c > q / 2)
            acc = self.digits[0] @ c
            scratch = np.empty_like(acc)
            _reduce(acc, q, scratch)
            for digit in self.digits[1:]:
                acc *= shift
                acc += digit @ c
                _reduce(acc, q, scratch)
            out[:, :, j, :] = acc.reshape(n_out, size, degree)
        return out


def _reduce(acc: np.ndarray, q: int, scratch: np.ndarray) -> None:
    """``acc mod q`` into ``[0, q)``, in place; exact for integers ``|acc| < 2^53``."""
    np.multiply(acc, 1.0 / q, out=scratch)
    np.floor(scratch, out=scratch)
    scratch *= q
    acc -= scratch
    np.add(acc, q, out=acc, where=acc < 0)
    np.subtract(acc, q, out=acc, where=acc >= q)


def _balanced_digits(weights: np.ndarray, base: int) -> list[np.ndarray]:
    """Digits ``d_i`` in ``[-2^(base-1), 2^(base-1))`` with ``W = sum d_i 2^(base*i)``."""
    digits = []
    rest = weights.astype(np.int64)
    radix = 1 << base
    while np.any(rest):
        d = ((rest + radix // 2) % radix) - radix // 2
        digits.append(d)
        rest = (rest - d) // radix
    return digits[::-1] or [np.zeros_like(weights)]


def add_constant(data: np.ndarray, values: np.ndarray, scale: float,
                 moduli: tuple[int, ...]) -> None:
    """Add ``values[o]`` (encoded at ``scale``) to every slot of ciphertext ``o``, in place.

    A constant CKKS plaintext is the constant polynomial ``round(value * scale)``, whose NTT
    form has that value in every coefficient, so it is added to every NTT coefficient of
    the first polynomial, limb by limb: exactly what SEAL's ``add_plain`` does.
    """
    for o, value in enumerate(values):
        if value == 0.0:
            continue
        product = float(value) * scale  # rounded half away from zero, as SEAL does
        encoded = int(math.copysign(math.floor(abs(product) + 0.5), product))
        if abs(encoded) >= 2 ** 62:
            raise ParameterError(f"bias {value} is too large for scale {scale}")
        for j, q in enumerate(moduli):
            residue = np.uint64(encoded % q)
            row = data[o, 0, j]
            np.add(row, residue, out=row)
            row[row >= q] -= np.uint64(q)
