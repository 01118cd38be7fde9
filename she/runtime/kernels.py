"""The hot loop: exact integer linear combinations of ciphertexts.

A linear layer with integer weights maps ciphertexts ``c_k`` to ``sum_k W[o, k] * c_k``.
Both ciphertext polynomials are linear in the message, and SEAL keeps CKKS ciphertexts in
NTT form, where this combination is the same combination of the coefficient arrays, limb by
limb, modulo each RNS prime ``q``. So a whole layer is one matrix product per limb:
``W @ C_q mod q`` with ``C_q`` the ``(inputs, 2 * N)`` coefficient matrix of limb ``q``.

The product runs in float64 (BLAS, or scipy's sparse kernel for sparse layers), which is
exact while every partial sum stays below 2^53. A convolution's rows fall into a few groups
that read the same inputs (one group per output position: every channel there sees the same
window); the product is then one dense BLAS product per group over just those inputs
(faster than the sparse kernel from groups of a few dozen weights on). When
``max|row| * q/2`` fits, coefficients are centred to ``|c| <= q/2`` and multiplied at once;
otherwise (wide layers, primes of up to 60 bits) each coefficient is cut into ``k``-bit
pieces, ``W @ piece`` is exact for each, and the pieces' sum is reduced once: known exactly
modulo 2^64 and approximately in float64, it gives its quotient by ``q`` within one. The
result is bit-exact against SEAL's evaluator (see ``tests/test_kernels.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import ParameterError

_EXACT_BITS = 53
#: Use a sparse product below this weight density.
SPARSE_DENSITY = 0.25
#: Narrowest coefficient piece worth a product (narrower: the layer is refused).
MIN_PIECE_BITS = 8
#: A sparse layer whose rows share their inputs in groups of at least this many weights on
#: average is multiplied group by group with dense BLAS products (one BLAS thread, see
#: :func:`she.runtime.engine.one_blas_thread`; measured on 4096 coefficients of a 52-bit
#: limb against scipy's sparse kernel: convolutions with groups of 4 x 9 weights 1.2x
#: faster, 16 x 25 1.5x, 32 x 25 1.7x, 64 x 144 4.8x).
GROUP_MIN_WEIGHTS = 32


@dataclass
class RowGroup:
    """Rows of a layer that read the same inputs: ``weights`` is their dense block."""

    rows: np.ndarray
    columns: np.ndarray
    weights: np.ndarray  # float64 (len(rows), len(columns))


@dataclass
class LinearKernel:
    """An integer weight matrix prepared for the exact modular product."""

    weights: np.ndarray | sp.csr_matrix  # float64 (dense or sparse)
    row_mass: float  # max_o sum_k |W[o, k]|
    #: Sparse layers whose rows read their inputs in large groups: the product by groups.
    groups: list[RowGroup] | None = None

    @classmethod
    def build(cls, weights: np.ndarray | sp.spmatrix, max_prime: int) -> LinearKernel:
        """Prepare ``weights`` (int64, (n_out, n_in), dense or scipy.sparse) for primes up to
        ``max_prime``."""
        row_mass = float(np.asarray(abs(weights).sum(axis=1)).max(initial=0))
        size = max(weights.shape[0] * weights.shape[1], 1)
        nonzero = weights.nnz if sp.issparse(weights) else np.count_nonzero(weights)
        if nonzero / size < SPARSE_DENSITY:
            matrix = sp.csr_matrix(weights, dtype=np.float64)
        else:
            matrix = (weights.toarray() if sp.issparse(weights) else weights).astype(np.float64)
        kernel = cls(matrix, row_mass)
        if kernel.piece_bits(max_prime) < MIN_PIECE_BITS:
            raise ParameterError(
                f"a layer whose rows sum to {row_mass:.3g} in absolute value is too wide for "
                f"exact float64 arithmetic"
            )
        if sp.issparse(kernel.weights):
            kernel.groups = _row_groups(kernel.weights, nonzero)
        return kernel

    @property
    def n_out(self) -> int:
        """Output ciphertexts of the layer."""
        return int(self.weights.shape[0])

    def piece_bits(self, q: int) -> int:
        """Bits per coefficient piece for prime ``q`` (``q``'s full width: one product)."""
        if self.row_mass * (q / 2) < 2.0 ** _EXACT_BITS:
            return q.bit_length()
        return _EXACT_BITS - 1 - math.ceil(math.log2(max(self.row_mass, 1.0)))

    def apply(self, data: np.ndarray, moduli: tuple[int, ...]) -> np.ndarray:
        """``W @ data mod q`` for every limb.

        ``data`` has shape ``(n_in, size, limbs, N)`` (uint64); returns
        ``(n_out, size, limbs, N)``.
        """
        n_in, size, limbs, degree = data.shape
        out = np.empty((self.n_out, size, limbs, degree), dtype=np.uint64)
        for j, q in enumerate(moduli):
            c = data[:, :, j, :].reshape(n_in, size * degree)
            bits = self.piece_bits(q)
            if bits >= q.bit_length():
                out[:, :, j, :] = self._centred_product(c, q).reshape(self.n_out, size, degree)
            else:
                out[:, :, j, :] = self._piecewise_product(c, q, bits).reshape(self.n_out, size, degree)
        return out

    def _product(self, x: np.ndarray) -> np.ndarray:
        """``W @ x`` in float64 (exact: every partial sum stays below 2^53)."""
        if self.groups is None:
            return self.weights @ x
        out = np.zeros((self.n_out, x.shape[1]))
        for group in self.groups:
            out[group.rows] = group.weights @ x[group.columns]
        return out

    def _centred_product(self, c: np.ndarray, q: int) -> np.ndarray:
        x = c.astype(np.float64)
        np.subtract(x, q, out=x, where=x > q / 2)
        return _reduced(self._product(x), q)

    def _piecewise_product(self, c: np.ndarray, q: int, bits: int) -> np.ndarray:
        """``W @ c mod q`` from ``bits``-bit pieces of ``c``.

        Each piece's product ``P_p`` is exact in float64 (integers below 2^52). Their sum
        ``T = sum_p P_p 2^(bits p)`` is then known exactly modulo 2^64 (wrapping uint64
        arithmetic) and to float64 precision, which is enough to find ``floor(T / q)`` within
        one (``|T| / q <= row_mass``, far below 2^50): ``T - floor(T / q) q`` computed modulo
        2^64 is the exact remainder, up to one correction each way."""
        wrapped = np.zeros((self.n_out, c.shape[1]), dtype=np.uint64)
        approx = np.zeros((self.n_out, c.shape[1]))
        mask = np.uint64((1 << bits) - 1)
        for p in range(math.ceil(q.bit_length() / bits)):
            piece = ((c >> np.uint64(bits * p)) & mask).astype(np.float64)
            part = self._product(piece)
            wrapped += part.astype(np.int64).view(np.uint64) << np.uint64(bits * p)
            approx += part * 2.0 ** (bits * p)
        approx *= 1.0 / q
        quotient = np.floor(approx, out=approx).astype(np.int64).view(np.uint64)
        quotient *= np.uint64(q)
        wrapped -= quotient
        out = wrapped.view(np.int64)
        np.add(out, np.int64(q), out=out, where=out < 0)
        np.subtract(out, np.int64(q), out=out, where=out >= q)
        return wrapped


def _row_groups(weights: sp.csr_matrix, nonzero: int) -> list[RowGroup] | None:
    """The rows of ``weights`` grouped by the inputs they read, when the groups are large
    enough (:data:`GROUP_MIN_WEIGHTS`) to be worth dense products; None otherwise. Rows
    without weights belong to no group (their output is zero)."""
    by_columns: dict[bytes, list[int]] = {}
    for row in range(weights.shape[0]):
        columns = weights.indices[weights.indptr[row]:weights.indptr[row + 1]]
        if len(columns):
            by_columns.setdefault(np.sort(columns).tobytes(), []).append(row)
    if not by_columns or nonzero / len(by_columns) < GROUP_MIN_WEIGHTS:
        return None
    groups = []
    for key, rows in by_columns.items():
        columns = np.frombuffer(key, dtype=weights.indices.dtype).astype(np.intp)
        block = np.ascontiguousarray(weights[rows][:, columns].toarray())
        groups.append(RowGroup(np.asarray(rows), columns, block))
    return groups


def _reduced(acc: np.ndarray, q: int) -> np.ndarray:
    """``acc mod q`` in ``[0, q)`` as uint64; exact for integers ``|acc| < 2^53``.

    The quotient is estimated in float64 (off by at most one: ``|acc| / q < 2^33``), the
    remainder computed exactly in int64 and corrected once each way (about twice as fast
    as numpy's integer ``mod``, which divides)."""
    out = acc.astype(np.int64)
    quotient = np.floor(acc * (1.0 / q)).astype(np.int64)
    quotient *= np.int64(q)
    out -= quotient
    np.add(out, np.int64(q), out=out, where=out < 0)
    np.subtract(out, np.int64(q), out=out, where=out >= q)
    return out.view(np.uint64)


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


def add_constant_bfv(data: np.ndarray, values: np.ndarray, plain_modulus: int,
                     moduli: tuple[int, ...]) -> None:
    """BFV: add the integer ``values[o]`` to every slot of ciphertext ``o``, in place.

    A constant batched plaintext is the constant polynomial ``v = values[o] mod t``; SEAL's
    ``add_plain`` adds ``floor((Q * v + floor((t + 1) / 2)) / t)`` (``Q``: the product of the
    ciphertext's primes) to coefficient 0 of the first polynomial, which is in coefficient
    form. The same is done here, limb by limb.
    """
    t = plain_modulus
    big_q = math.prod(moduli)
    for o, value in enumerate(values):
        v = int(value) % t
        if v == 0:
            continue
        delta = (big_q * v + (t + 1) // 2) // t
        for j, q in enumerate(moduli):
            data[o, 0, j, 0] = np.uint64((int(data[o, 0, j, 0]) + delta) % q)
