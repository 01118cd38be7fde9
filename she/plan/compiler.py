"""Compiling a lowered model into an encrypted execution plan.

The compiler quantises every affine layer to integer weights ``W_int = round(W * 2^f)``
(exact for power-of-two or fixed-point weights), so that a linear layer is an integer
combination of ciphertexts that costs no multiplicative level: its ``2^-f`` goes into the
ciphertext scale. Only the squares consume levels. From the value ranges (calibration data,
or interval arithmetic over the declared input range) and a noise model it then chooses
the modulus chain and the smallest ring size that keeps 128-bit security (or more).

Modulus chain layout (SEAL rescales by the last ciphertext prime first)::

    [ output primes | primes dropped at depth D | ... | at depth 1 | special prime ]

In a graph (skip connections, branches) every square at the same depth (the longest path
from the input) drops the same primes, so all sources at one depth share one level and one
scale. A layer that reads sources of different depths (a skip connection) works at the
level of its deepest source: the shallower ones lose their extra primes (exact: in NTT form
that is dropping limbs), and their columns of integer weights carry the ratio of the
scales, ``round(W * 2^F * scale_ref / scale_s)``. With ``F >= scale_bits -``
:data:`ALIGN_SLACK_BITS` that rounding is about one rescale's noise and enters the error
model like any weight rounding; columns whose scale equals the reference scale stay exact.
Alternatively (``skip_alignment``) the shallower terms are rescaled early: multiplied by an
integer in SEAL and rescaled by the primes between the two levels, which costs no bits; by
default only when that makes the ring smaller.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import tenseal.sealapi as sealapi

from ..errors import ModelError, ParameterError
from ..frontend import tail
from ..frontend.lowering import Affine, Chain, lower
from ..frontend.model import Model
from ..io import compact
from . import bfv, layout
from .params import (
    MAX_MODULUS_BITS,
    MIN_PRIME_BITS,
    RING_SIZES,
    EncryptionParameters,
    smallest_ring,
)

SPEC_FORMAT = "she-spec/1"
#: A layer that adds sources of different depths carries at least ``scale_bits`` less this
#: many fractional bits in its integer weights: the scale ratios folded into them are
#: rounded by at most ``2^-(scale_bits - ALIGN_SLACK_BITS + 1)`` per weight, about the
#: rounding noise of one rescale (and the error model counts it).
ALIGN_SLACK_BITS = 8
#: Largest ciphertext prime (SEAL's limit; :mod:`she.runtime.kernels` cuts wide coefficients into
#: pieces, so fewer, larger primes cost the kernels nothing and make every SEAL operation
#: and key smaller).
MAX_CT_PRIME_BITS = 60
#: Single packing rotates ciphertexts at the input scale, and a rotation's key-switching
#: noise grows as ``2^(largest ciphertext prime - special prime)``: with the special prime
#: as large as the largest one, one rotation at scale 2^22 erred by up to 0.6 (measured,
#: N=16384). Single packing keeps its ciphertext primes this many bits below a 60-bit
#: special prime (measured: 0.005-0.03 at 4 bits; 6 leaves a margin).
KEYSWITCH_GUARD_BITS = 6
#: Extra bits of the plaintext diagonals in single packing: CKKS encoding rounds every
#: coefficient, which costs about log2(sqrt(N/12)) ~ 5 bits of weight precision. Settings
#: with ``weight_bits`` above 12 add the difference: wide layers (thousands of inputs) sum
#: so many rounded products that exact (power-of-two) weights need it too. (The ladder's
#: rungs may ask for more, see :data:`SINGLE_PRECISION_LADDER`.)
ENCODE_GUARD_BITS = 6
PACKINGS = ("batch", "single")
#: Ways to align the scales of a skip connection (``compile(skip_alignment=...)``).
SKIP_ALIGNMENTS = ("auto", "integer", "rescale")
#: Batch packing streams wide layers: at most about this many bytes of one layer's
#: ciphertexts (before and after its square) are held at once.
BATCH_CHUNK_BYTES = 1 << 30
#: Secret-key encryption noise (standard deviation per coefficient, SEAL's default).
NOISE_SIGMA = 3.2
#: Single packing: the client rounds away as many low bits of its ciphertext as raise the
#: predicted output error by at most this share (a smaller upload for a little noise).
DROP_ERROR_SHARE = 0.1
#: The predicted error is this many standard deviations of the worst sample's output noise.
SIGMAS = 6.0
#: Calibration samples the error model follows (those with the largest activations).
ERROR_SAMPLES = 64
#: How many bits beyond ``weight_bits`` an exactly representable layer may use.
EXACT_EXTRA_BITS = 8
#: :func:`quantise` tries a shift on this many weights before all of them (most shifts of
#: weights that are not exact fail on the first few).
EXACT_PROBE = 4096
#: (scale_bits, weight_bits) settings tried in order when the caller fixes neither.
PRECISION_LADDER = ((26, 12), (28, 14), (30, 16), (32, 18))
#: The same for single packing, with the guard bits of the diagonals' encoding third
#: (:func:`encode_guard_bits` for the first eight): a smaller scale first keeps the rescale
#: primes single and the ring at N=8192 when the precision allows it (and makes the upload,
#: one prime-wide polynomial, smaller). In deep or residual networks the encoding error of
#: the diagonals, amplified by every square, is what limits precision, hence rungs with
#: more guard bits (measured on the CIFAR-sized benchmark network at N=16384: predicted
#: error 0.087 with 14 guard bits, 0.0085 with 18, 0.0005 with 22).
SINGLE_PRECISION_LADDER = ((20, 12, 6), (22, 12, 6), (24, 12, 6), (26, 12, 6), (28, 14, 8),
                           (30, 16, 10), (32, 18, 12), (34, 20, 14), (24, 12, 14), (26, 12, 18),
                           (36, 20, 18), (38, 20, 22))


def encode_guard_bits(weight_bits: int) -> int:
    """Single packing: the guard bits of the diagonals when the caller fixes the precision
    (:data:`ENCODE_GUARD_BITS`, and what ``weight_bits`` above 12 add)."""
    return ENCODE_GUARD_BITS + max(0, weight_bits - 12)


@dataclass
class PlanLayer:
    """One affine layer of a plan, quantised for the integer kernel."""

    weights: np.ndarray | sp.csr_matrix  # (n_out, n_in) int64: W_int = round(W * 2^shift)
    shift: int  # f: the layer's real weights are weights * 2^-shift
    bias: np.ndarray  # (n_out,) float64, added at the output scale
    out_shape: tuple[int, ...]
    rescale_primes: int  # primes dropped after the square that follows (0 for the last layer)
    value_bound: float  # bound on |pre-square value| used for capacity
    weight_error: float  # max over outputs of the weight-quantisation error (absolute)
    #: Single packing: primes dropped right after the product (its diagonals are encoded at
    #: their product, so the scale is unchanged). Batch packing: 0, the 2^-shift goes into
    #: the scale instead.
    product_primes: int = 0
    #: Sources the layer reads (0: the input, k + 1: the square of layer k), concatenated.
    sources: tuple[int, ...] = ()
    #: Shallower sources whose terms are *rescaled early* to the layer's level (multiplied
    #: by :meth:`Plan.early_constant` and rescaled in SEAL) instead of carrying the ratio of
    #: the scales in their integer weights (see :func:`_align`).
    early_sources: tuple[int, ...] = ()

    @property
    def exact(self) -> bool:
        return self.weight_error == 0.0


@dataclass
class Plan:
    """Everything needed to run a model encrypted: parameters, scales and layers."""

    model_name: str
    scheme: str
    packing: str
    input_shape: tuple[int, ...]
    params: EncryptionParameters
    input_scale: float
    layers: list[PlanLayer]
    predicted_error: float
    chain: Chain = field(repr=False)
    calibrated: bool = False
    notes: list[str] = field(default_factory=list)
    #: BFV: the integer range of quantised inputs ``round(x * input_scale)``.
    input_int_range: tuple[int, int] | None = None
    #: Single packing: low bits of every input coefficient the client rounds away before
    #: sending (:mod:`she.io.compact`); chosen within :data:`DROP_ERROR_SHARE`.
    input_drop_bits: int = 0
    #: CKKS noise flooding of the results (:mod:`she.runtime.privacy`): the statistical distance
    #: exponent ``s`` and ``log2`` of the flooding bound; ``predicted_error`` includes it.
    circuit_privacy: int | None = None
    flood_bits: int | None = None
    #: CKKS: the part of ``predicted_error`` due to encryption noise (without the measured
    #: weight-quantisation deviation, which is part of the function computed).
    noise_error: float | None = None
    #: The model's plaintext tail (:mod:`she.frontend.tail`), re-applied by the client after decryption.
    tail: str | None = None
    _layouts: list[layout.LayerLayout] | None = field(default=None, init=False, repr=False,
                                                       compare=False)

    def __post_init__(self) -> None:
        for k, layer in enumerate(self.layers):
            layer.sources = layer.sources or (k,)

    @property
    def depth(self) -> int:
        """Multiplicative depth: squares on the longest path from the input to the output."""
        return self.chain.depth

    @property
    def squares(self) -> int:
        """Squared layers (every layer but the output)."""
        return len(self.layers) - 1

    @property
    def n_inputs(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].weights.shape[0]

    @property
    def batch_capacity(self) -> int:
        """Samples per request: one per slot in batch packing, one in single packing."""
        return self.params.slots if self.packing == "batch" else 1

    @property
    def input_ciphertexts(self) -> int:
        return self.n_inputs if self.packing == "batch" else 1

    @property
    def output_ciphertexts(self) -> int:
        return self.n_outputs if self.packing == "batch" else 1

    def layouts(self) -> list[layout.LayerLayout]:
        """Single packing: the slot layout and diagonal schedule of every *block* (computed
        once: placing the hidden units takes a moment): one per layer and source it reads,
        layer by layer (a chain: one per layer; see :func:`she.plan.layout.layouts` and
        :meth:`layer_blocks`)."""
        if self._layouts is None:
            self._layouts = layout.layouts([layer.weights for layer in self.layers],
                                           self.params.slots,
                                           [layer.sources for layer in self.layers])
        return self._layouts

    def layer_blocks(self) -> list[range]:
        """Single packing: which entries of :meth:`layouts` (and :meth:`diagonal_scales`)
        belong to each layer."""
        return layout.layer_blocks([layer.sources for layer in self.layers])

    def rotation_steps(self) -> list[int]:
        """Galois steps the plan rotates by (none in batch packing)."""
        return layout.rotation_steps(self.layouts()) if self.packing == "single" else []

    def output_scale(self) -> float:
        """Scale of the outputs: the CKKS ciphertext scale (follows from the chain and the
        primes), or the integer scale of BFV's quantised outputs."""
        return self.scales()[-1][1]

    @property
    def ciphertext_scale(self) -> float:
        """The scale field of input ciphertexts (BFV's is always 1)."""
        return self.input_scale if self.scheme == "ckks" else 1.0

    def quantise_inputs(self, x: np.ndarray) -> np.ndarray:
        """BFV: the quantised model's integer inputs for ``x`` (batch, *input_shape)."""
        if self.input_int_range is None:
            raise ParameterError("only BFV plans have integer inputs")
        return bfv.quantise_inputs(np.asarray(x).reshape(len(x), -1), self.input_scale,
                                   self.input_int_range)

    def run_integers(self, x_int: np.ndarray) -> np.ndarray:
        """BFV: the quantised model, exactly (int64 outputs at :meth:`output_scale`)."""
        return bfv.run_integers([layer.weights for layer in self.layers],
                                [layer.bias for layer in self.layers], x_int)

    def sources(self) -> tuple[list[int], list[float], list[int]]:
        """``(limbs, scales, references)``: the number of primes and the scale of every
        source (0: the input, ``k + 1``: the square of layer ``k``, and a last entry for the
        output), from the actual primes; and the *reference* source of every layer, its
        deepest (fewest primes): the layer works at that source's level and scale."""
        primes = self.params.ciphertext_primes
        limbs, scales, refs = [len(primes)], [self.input_scale], []
        for layer in self.layers:
            ref = min(layer.sources, key=lambda s: (limbs[s], -scales[s]))
            refs.append(ref)
            n, delta = limbs[ref] - layer.product_primes, scales[ref]
            s_out = delta if layer.product_primes else delta * 2.0 ** layer.shift
            squared = s_out * s_out
            for _ in range(layer.rescale_primes):  # SEAL drops the last prime first
                squared /= primes[n - 1]
                n -= 1
            limbs.append(n)
            scales.append(squared if layer is not self.layers[-1] else s_out)
        return limbs, scales, refs

    def early_constant(self, index: int, source: int) -> float:
        """The integer (as a float) that layer ``index``'s terms from ``source``, one of its
        :attr:`PlanLayer.early_sources`, are multiplied by before being rescaled to the
        layer's level: ``scale_ref * Q / scale_source`` rounded, where ``Q`` is the product of
        the primes the rescale drops. The terms then land at the layer's scale up to a
        relative ``2^-log2(Q)``."""
        limbs, scales, refs = self.sources()
        ref = refs[index]
        dropped = math.prod(float(p) for p in self.params.ciphertext_primes[limbs[ref]:limbs[source]])
        return float(round(scales[ref] * dropped / scales[source]))

    def scales(self) -> list[tuple[float, float]]:
        """(input scale, output scale) of every layer, from the actual primes."""
        _, scales, refs = self.sources()
        return [(scales[ref], scales[ref] * (1.0 if layer.product_primes else 2.0 ** layer.shift))
                for layer, ref in zip(self.layers, refs, strict=True)]

    def levels(self) -> list[int]:
        """Number of ciphertext primes at the input of every layer."""
        limbs, _, refs = self.sources()
        return [limbs[ref] for ref in refs]

    @property
    def output_limbs(self) -> int:
        return self.sources()[0][-1]

    def chunk_units(self, index: int) -> int:
        """Batch packing: units of layer ``index`` computed, squared and passed on to the
        next layer at a time (all of them when they fit :data:`BATCH_CHUNK_BYTES`)."""
        unit = 3 * 8 * 2 * self.params.poly_modulus_degree * self.levels()[index]
        return max(1, min(self.layers[index].weights.shape[0], BATCH_CHUNK_BYTES // unit))

    def batch_memory_bytes(self) -> int:
        """Batch packing: about the server's peak memory for one request (see
        :class:`~she.runtime.engine.Engine`). The input ciphertexts are held until the last layer
        that reads them; a layer's outputs and their squares one chunk at a time
        (:meth:`chunk_units`), each chunk's products added into the accumulated outputs
        of every later layer that reads it, which are held whole until that layer runs."""
        unit = 8 * 2 * self.params.poly_modulus_degree
        levels = self.levels()
        last_input = max(k for k, layer in enumerate(self.layers) if 0 in layer.sources)
        # layer i's accumulated outputs exist from the layer whose square it first reads (a
        # layer that reads the input only is computed a chunk at a time; the output whole)
        opened = [min((s - 1 for s in layer.sources if s), default=i)
                  for i, layer in enumerate(self.layers)]
        last = len(self.layers) - 1
        peak = 0
        for k in range(len(self.layers)):
            held = self.n_inputs * levels[0] if k <= last_input else 0
            held += sum(self.layers[i].weights.shape[0] * levels[i] for i in range(k, last + 1)
                        if opened[i] <= k and (i > k or opened[i] < i or i == last))
            if k < self.squares:
                held += 3 * self.chunk_units(k) * levels[k]
            peak = max(peak, unit * held)
        return peak

    def diagonal_scales(self) -> list[float]:
        """Single packing: the scale every block's diagonals (see :meth:`layouts`) are
        encoded at. The reference source's: ``2^shift``, or the prime its product drops
        when the layer has one. A shallower source's (a skip connection; the engine first
        drops its extra primes, which is exact): that times ``scale_ref / scale_source``, so
        that every product of the layer lands at the same scale (up to the rounding of one
        floating-point product, which the engine sets exactly) and their sum is exact."""
        primes = self.params.ciphertext_primes
        limbs, scales, refs = self.sources()
        out = []
        for layer, ref in zip(self.layers, refs, strict=True):
            own = (float(primes[limbs[ref] - 1]) if layer.product_primes
                   else 2.0 ** layer.shift)
            out += [own * scales[ref] / scales[s] for s in layer.sources]
        return out

    def spec(self) -> dict[str, Any]:
        """The public description a client needs (JSON-serialisable, no secrets)."""
        return {
            "format": SPEC_FORMAT,
            "model": self.model_name,
            "scheme": self.scheme,
            "packing": self.packing,
            "poly_modulus_degree": self.params.poly_modulus_degree,
            "modulus_bits": list(self.params.modulus_bits),
            "primes": [str(p) for p in self.params.primes],
            "security_bits": self.params.security,
            "input_shape": list(self.input_shape),
            "input_scale": self.input_scale,
            "input_ciphertexts": self.input_ciphertexts,
            "batch_capacity": self.batch_capacity,
            "output_size": self.n_outputs,
            "output_ciphertexts": self.output_ciphertexts,
            "output_limbs": self.output_limbs,
            "output_scale": self.output_scale(),
            "depth": self.depth,
            "galois_steps": self.rotation_steps(),
            "input_replicas": self.layouts()[0].replicas if self.packing == "single" else 1,
            # copy r of the input is rotated by r * shift: no shift with one copy
            "input_shift": (self.layouts()[0].n_diagonals
                            if self.packing == "single" and self.layouts()[0].replicas > 1 else 0),
            "input_drop_bits": self.input_drop_bits,
            "layout": self._layout_text(),
            **({"tail": self.tail} if self.tail else {}),
            **({"plain_modulus": str(self.params.plain_modulus),
                "input_int_range": list(self.input_int_range or ())} if self.scheme == "bfv" else {}),
        }

    def _layout_text(self) -> str:
        if self.packing == "batch":
            return ("batch: ciphertext i holds feature i (C-order) of every sample, sample b in "
                    "slot b; output ciphertext j holds output j")
        first = self.layouts()[0]
        p_out = layout.period(self.n_outputs)
        return (f"single: one ciphertext holds the sample's features (C-order) zero-padded to "
                f"{first.p_in} and repeated over all slots, copy r (slots r*{first.p_in} and up, r "
                f"modulo {first.replicas}) rotated left by r*{first.n_diagonals}; the output "
                f"ciphertext holds the outputs in slots 0..{self.n_outputs - 1} (repeated every "
                f"{p_out} slots)")

    def describe(self) -> dict[str, Any]:
        """A report of the plan for ``she inspect`` (JSON-serialisable)."""
        n = self.params.poly_modulus_degree
        ct_primes = len(self.params.ciphertext_primes)
        ct_bytes = 2 * ct_primes * n * 8
        # Seeded serialisations store one polynomial of each pair (keys; single-packing input).
        relin_bytes = ct_primes * len(self.params.primes) * n * 8
        upload = (compact.packed_size(self.params.ciphertext_primes, n, self.input_drop_bits)
                  if self.packing == "single" else ct_bytes * self.input_ciphertexts)
        steps = self.rotation_steps()
        layers = []
        for i, (layer, (s_in, s_out), limbs) in enumerate(
            zip(self.layers, self.scales(), self.levels(), strict=True)
        ):
            nnz = _nonzero(layer.weights)
            layers.append({
                "index": i,
                "inputs": int(layer.weights.shape[1]),
                "outputs": int(layer.weights.shape[0]),
                "nonzero_weights": nnz,
                "weight_shift": layer.shift,
                "max_abs_int_weight": int(abs(layer.weights).max()) if nnz else 0,
                "sources": list(layer.sources),
                "early_rescaled_sources": list(layer.early_sources),
                "exact_weights": layer.exact,
                "activation": "square" if i < self.squares else "none (output)",
                "rescale_primes": layer.rescale_primes,
                "input_limbs": limbs,
                "log2_scale_in": round(math.log2(s_in), 2),
                "log2_scale_out": round(math.log2(s_out), 2),
                "value_bound": layer.value_bound,
            })
        return {
            "model": self.model_name,
            "scheme": self.scheme,
            "packing": self.packing,
            "depth": self.depth,
            "squares": self.squares,
            "security_bits": self.params.security,
            "poly_modulus_degree": n,
            "slots": self.params.slots,
            "modulus_bits": list(self.params.modulus_bits),
            "total_modulus_bits": self.params.total_bits,
            "plain_modulus_bits": self.params.plain_modulus.bit_length() or None,
            "max_modulus_bits_for_ring": MAX_MODULUS_BITS[self.params.security][n],
            "input_scale_log2": round(math.log2(self.input_scale), 2),
            "input_drop_bits": self.input_drop_bits,
            "input_ciphertexts": self.input_ciphertexts,
            "output_ciphertexts": self.output_ciphertexts,
            "galois_steps": steps,
            "rotations": sum(lay.rotations for lay in self.layouts()) if steps else 0,
            "predicted_max_output_error": self.predicted_error,
            "calibrated": self.calibrated,
            "estimated_bytes": {
                "ciphertext_fresh": ct_bytes,
                "relin_keys": relin_bytes,
                # single packing: one key per rotation step, and the conjugation's
                "galois_keys": relin_bytes * (len(steps) + (self.packing == "single")),
                "upload_per_request": upload,
                "server_memory_per_request": (self.batch_memory_bytes()
                                              if self.packing == "batch" else None),
            },
            "layers": layers,
            "notes": self.notes,
        }


# -- quantisation ---------------------------------------------------------------------------

def _nonzero(matrix: np.ndarray | sp.spmatrix) -> int:
    """Non-zero entries of a dense or sparse matrix."""
    return int(matrix.count_nonzero() if sp.issparse(matrix) else np.count_nonzero(matrix))


def _applied(matrix: np.ndarray | sp.spmatrix, x: np.ndarray) -> np.ndarray:
    """``x @ matrix.T`` for a batch ``x`` (B, n_in) and a dense or sparse matrix."""
    return np.asarray(matrix @ x.T).T


def _squared(matrix: np.ndarray | sp.spmatrix) -> np.ndarray | sp.spmatrix:
    """Element-wise square of a dense or sparse matrix."""
    return matrix.multiply(matrix).tocsr() if sp.issparse(matrix) else matrix * matrix


def _with_data(matrix: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    """A sparse matrix of ``matrix``'s pattern holding ``data`` (its own index arrays: scipy
    sorts them in place when it needs to)."""
    return sp.csr_matrix((data, matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape)


def _same_pattern(matrix: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    """A sparse matrix of ``matrix``'s (canonical) pattern holding ``data``, *sharing*
    ``matrix``'s index arrays: for the compiler's read-only intermediates, where every rung's
    weights of one layer have one pattern (a wide layer's indices are most of its bytes)."""
    out = sp.csr_matrix((data, matrix.indices, matrix.indptr), shape=matrix.shape, copy=False)
    out.has_canonical_format = True
    return out


def _canonical(matrix: sp.spmatrix) -> sp.csr_matrix:
    """``matrix`` as CSR with sorted indices and no duplicates (itself when it is)."""
    if sp.isspmatrix_csr(matrix) and matrix.has_canonical_format:
        return matrix
    matrix = sp.csr_matrix(matrix, copy=True)
    matrix.sum_duplicates()
    return matrix


def quantise(matrix: np.ndarray | sp.spmatrix, weight_bits: int,
             max_shift: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """Integer weights ``W_int`` and shift ``f`` with ``W ~= W_int * 2^-f``.

    If the weights are exactly representable with at most ``weight_bits +``
    :data:`EXACT_EXTRA_BITS` bits below the largest (power-of-two or fixed-point weights)
    the result is exact; otherwise the largest weight gets ``weight_bits`` bits. With
    ``max_shift``, ``f`` is at most that: weights that are not exact within it are rounded
    to it (or to ``weight_bits +`` :data:`EXACT_EXTRA_BITS` bits if fewer). Returns
    ``(W_int, f, abs_error)``, sparse (of the same pattern) for a sparse ``matrix``.
    """
    if sp.issparse(matrix):
        matrix = _canonical(matrix)
        w_int, f, err = quantise(matrix.data, weight_bits, max_shift)
        return _with_data(matrix, w_int), f, _with_data(matrix, err)
    amax = float(np.abs(matrix).max(initial=0.0))
    if amax == 0.0:
        return np.zeros(matrix.shape, dtype=np.int64), 0, np.zeros(matrix.shape)
    f_approx = weight_bits - 1 - math.floor(math.log2(amax))
    most = f_approx + EXACT_EXTRA_BITS if max_shift is None else min(
        f_approx + EXACT_EXTRA_BITS, max_shift)
    # Exact power-of-two / fixed-point weights may span a few more bits than weight_bits:
    # exactness is worth a larger shift (the kernel splits wide integers into digits).
    probe = np.ravel(matrix)[:EXACT_PROBE]  # a shift that fails on it fails on all
    for f in range(min(0, f_approx), most + 1):
        if not np.array_equal(probe * 2.0 ** f, np.round(probe * 2.0 ** f)):
            continue
        scaled = matrix * 2.0 ** f
        if np.array_equal(scaled, np.round(scaled)):
            return scaled.astype(np.int64), f, np.zeros(matrix.shape)
    if max_shift is not None:  # as many bits as the cap allows (no more than exactness would)
        f_approx = min(max(f_approx, most), max_shift)
    w_int = np.round(matrix * 2.0 ** f_approx)
    return w_int.astype(np.int64), f_approx, np.abs(matrix - w_int * 2.0 ** -f_approx)


# -- value ranges ---------------------------------------------------------------------------

def _interval_bounds(chain: Chain, lo: float, hi: float) -> list[np.ndarray]:
    """Sound bounds on |pre-square value| of every unit of every layer (interval arithmetic)."""
    lows = [np.full((1, chain.source_sizes[0]), lo)]
    highs = [np.full((1, chain.source_sizes[0]), hi)]
    bounds = []
    for k, layer in enumerate(chain.layers):
        low, high = chain.layer_input(lows, k)[0], chain.layer_input(highs, k)[0]
        centre, radius = (low + high) / 2, (high - low) / 2
        mid = layer.matrix @ centre + layer.bias
        rad = abs(layer.matrix) @ radius
        low, high = mid - rad, mid + rad
        bounds.append(np.maximum(np.abs(low), np.abs(high)))
        lows.append(np.where((low <= 0) & (high >= 0), 0.0, np.minimum(low * low, high * high))[None])
        highs.append(np.maximum(low * low, high * high)[None])
    return bounds


def _split_bits(bits: int, max_bits: int) -> list[int]:
    """Split ``bits`` into as few primes of at most ``max_bits`` as possible, evenly."""
    bits = max(bits, MIN_PRIME_BITS)
    count = math.ceil(bits / max_bits)
    base, extra = divmod(bits, count)
    parts = [base + (1 if i < extra else 0) for i in range(count)]
    return [max(p, MIN_PRIME_BITS) for p in parts]


# -- the compiler ---------------------------------------------------------------------------

def compile(  # noqa: A001 - the public name mirrors the documented API ``she.compile``
    model: Model | Chain,
    *,
    scheme: str = "ckks",
    packing: str = "batch",
    calibration: np.ndarray | None = None,
    scale_bits: int | None = None,
    weight_bits: int | None = None,
    security: int = 128,
    poly_modulus_degree: int | None = None,
    range_margin: float = 2.0,
    name: str | None = None,
    input_bits: int = bfv.INPUT_BITS,
    skip_alignment: str = "auto",
    circuit_privacy: int | None = None,
) -> Plan:
    """Compile an HE-friendly model into a :class:`Plan`.

    Args:
        model: a loaded :class:`~she.frontend.model.Model` (or an already lowered chain).
        scheme: ``"ckks"`` (approximate, any depth) or ``"bfv"`` (batch packing: an
            integer-quantised model reproduced exactly; see :mod:`she.plan.bfv`).
        packing: ``"batch"``: one sample per slot, every feature its own ciphertext (best
            throughput); ``"single"``: one sample in one ciphertext (lowest latency).
        calibration: optional sample inputs; value ranges then come from them (times
            ``range_margin``) instead of interval arithmetic over the declared input range.
        scale_bits: log2 of the scale of fresh ciphertexts and after every rescale.
        weight_bits: significant bits kept for weights that are not exactly representable
            (in single packing, above 12 it also adds guard bits to the diagonals' encoding,
            see :func:`encode_guard_bits`).
            When neither is given, the compiler tries every setting of
            :data:`PRECISION_LADDER` (:data:`SINGLE_PRECISION_LADDER` for single packing) and
            keeps the cheapest (smallest ring, then fewest primes, then fewest bits) whose
            predicted error keeps the argmax of the calibration samples.
        security: 128 (default), 192 or 256 bits; anything lower is refused.
        poly_modulus_degree: force a ring size (refused if it cannot hold the plan securely).
        range_margin: safety factor on calibrated value ranges.
        input_bits: BFV: bits of the quantised inputs' magnitude.
        skip_alignment: how a layer that adds sources of different depths (a skip
            connection) aligns their scales: ``"integer"`` folds the ratio of the scales into
            the integer weights (no SEAL operation, more modulus bits), ``"rescale"``
            multiplies the shallower terms by an integer and rescales them early (one SEAL
            product and rescale per unit, no extra bits); ``"auto"`` (default) rescales
            early only when that makes the ring smaller.
        circuit_privacy: CKKS: flood the results' noise to a statistical distance of
            ``2^-circuit_privacy`` (:mod:`she.runtime.privacy`); the flooding's error is added to the
            predicted error before the argmax check, so the ladder picks a precise enough
            setting or the model is refused.
    """
    if scheme not in ("ckks", "bfv"):
        raise ParameterError(f"scheme {scheme!r} is not supported; use 'ckks' or 'bfv'")
    if packing not in PACKINGS:
        raise ParameterError(f"packing {packing!r} is not supported; use one of {PACKINGS}")
    if skip_alignment not in SKIP_ALIGNMENTS:
        raise ParameterError(f"skip_alignment {skip_alignment!r} is not one of {SKIP_ALIGNMENTS}")
    if scheme == "bfv":
        if circuit_privacy is not None:
            raise ParameterError("noise flooding (circuit_privacy) is implemented for CKKS; "
                                 "BFV results are re-randomised only")
        return _with_tail(_compile_bfv(model, packing, calibration, input_bits,
                                       weight_bits or bfv.WEIGHT_BITS, security,
                                       poly_modulus_degree, name), model)
    if scale_bits is None and weight_bits is None:
        ladder = (SINGLE_PRECISION_LADDER if packing == "single" else
                  tuple((s, w, None) for s, w in PRECISION_LADDER))
        fits = (True, False) if packing == "batch" else (False,)
    else:
        ladder = ((scale_bits or 26, weight_bits or 12, None),)
        fits = (False,)
    chain = fold_constant_units(model if isinstance(model, Chain) else lower(model))
    if packing == "single":
        chain = _dense_chain(chain, "single packing")
    failure: ParameterError | None = None
    best: Plan | None = None
    layouts: dict[int, list[layout.LayerLayout]] = {}  # by slot count, shared by the rungs
    memo: dict[Any, Any] = {}  # what the rungs compute alike from the calibration data
    evaluated = None  # the calibration samples through the float model, shared by the rungs
    if calibration is not None:
        cal = np.asarray(calibration, dtype=np.float64)
        if cal.ndim < 1 or cal[0].size != chain.source_sizes[0]:
            raise ParameterError(
                f"calibration samples must have {chain.source_sizes[0]} features each "
                f"(input shape {chain.input_shape}), got array of shape {cal.shape}"
            )
        evaluated = chain.evaluate(cal.reshape(len(cal), -1))
    for rung, ((s_bits, w_bits, guard), fit) in enumerate(itertools.product(ladder, fits)):
        # only what later rungs read stays (a wide layer's quantisation is large)
        _forget_quantised(memo, {w for _, w, _ in ladder[rung // len(fits):]})
        plan = None  # the previous rung's, unless it is the best
        if fit and all(f <= _rescale_cap(s_bits)
                       for _, f, _ in _quantised(chain, w_bits, None, memo)[:-1]):
            continue  # every hidden layer's rescale fits one prime already
        # Cheapest first: ring size, number of primes, modulus bits (earlier rungs win ties),
        # so a rung whose parameters cost no less than the best plan's stops there.
        limit = None if best is None else _cost(best.params)
        try:
            plan = _compile_once(model, chain, scheme, packing, calibration, s_bits, w_bits,
                                 security, poly_modulus_degree, range_margin, name, layouts,
                                 evaluated, skip_alignment, memo, guard_bits=guard,
                                 fit_rescale=fit, cheaper_than=limit)
            if plan is not None and circuit_privacy is not None:
                # the output primes must also hold the flooding
                from ..runtime.privacy import budget_flooding, flooding_headroom_bits

                extra = flooding_headroom_bits(plan, circuit_privacy)
                if extra:
                    plan = _compile_once(model, chain, scheme, packing, calibration, s_bits,
                                         w_bits, security, poly_modulus_degree, range_margin,
                                         name, layouts, evaluated, skip_alignment, memo, extra,
                                         guard, fit, cheaper_than=limit)
                if plan is not None:
                    budget_flooding(plan, circuit_privacy,
                                    None if evaluated is None else evaluated[1][-1])
        except ParameterError as exc:
            failure = exc.with_traceback(None)  # not the failed rung's frames and arrays
            continue
        if plan is not None:
            best = plan
    if best is None:
        assert failure is not None
        raise failure
    return _with_tail(best, model)


def fold_constant_units(chain: Chain) -> Chain:
    """``chain`` with the squares of its *constant* units folded into the layers that read
    them: a hidden unit whose weights are all zero (a pruned unit or channel, a convolution
    output that sees only padding) has no encrypted input, its value is its bias, and its
    ciphertext would be transparent, which SEAL refuses to square. Its (public) square is
    added to the biases of every later layer that reads it and its columns there are zeroed,
    so no layer reads it any more (the engines leave such squares out); units that read
    only constant units become constant in turn, layer by layer. The function computed is
    the same. Returns ``chain`` itself when it has no constant unit."""
    layers = list(chain.layers)
    sizes = chain.source_sizes
    for k in range(len(layers) - 1):
        constant = np.flatnonzero(np.asarray(abs(layers[k].matrix).sum(axis=1)).ravel() == 0)
        if not len(constant):
            continue
        squares = layers[k].bias[constant] ** 2
        for i in range(k + 1, len(layers)):
            layer = layers[i]
            if k + 1 not in layer.sources:
                continue
            columns = sum(sizes[s] for s in layer.sources if s < k + 1) + constant
            bias = layer.bias + np.asarray(layer.matrix[:, columns] @ squares).ravel()
            layers[i] = Affine(_without_columns(layer.matrix, columns), bias, layer.out_shape,
                               layer.sources)
    if all(a is b for a, b in zip(layers, chain.layers, strict=True)):
        return chain
    return Chain(layers, chain.input_shape)


def _without_columns(matrix: np.ndarray | sp.spmatrix, columns: np.ndarray
                     ) -> np.ndarray | sp.csr_matrix:
    """A copy of ``matrix`` (of the same type and dtype) with ``columns`` zero."""
    if not sp.issparse(matrix):
        matrix = matrix.copy()
        matrix[:, columns] = 0
        return matrix
    matrix = sp.csr_matrix(matrix, copy=True)
    matrix.data[np.isin(matrix.indices, columns)] = 0
    matrix.eliminate_zeros()
    return matrix


def _with_tail(plan: Plan, model: Model | Chain) -> Plan:
    """The plan, carrying the model's plaintext tail (see :mod:`she.frontend.tail`) if it has one."""
    if isinstance(model, Model):
        plan.tail = model.metadata.get(tail.METADATA_KEY)
    return plan


def _dense_chain(chain: Chain, what: str) -> Chain:
    """``chain`` with dense matrices, for single packing (graphs of modest layers) and BFV
    (chains only): a graph in BFV, or a layer too wide for them, is refused with a clear
    error."""
    if what == "BFV" and not chain.is_chain:
        raise ParameterError(
            f"{what} runs chains of layers only, and this model adds or concatenates encrypted "
            "values across activations (a skip connection or branches); use CKKS (batch or "
            "single packing)")
    if what == "single packing":
        widest = max(max(max(chain.source_sizes[s] for s in layer.sources), layer.n_out)
                     for layer in chain.layers)
        most = max(RING_SIZES) // 2
        if widest > most:
            raise ParameterError(
                f"single packing holds at most {most} values per ciphertext (N={max(RING_SIZES)}), "
                f"and a layer of this model has {widest}: it would need "
                f"N={layout.min_ring_for([(widest, 1)])}, which SEAL does not offer; use batch "
                "packing")
    try:
        return chain.dense()
    except ModelError as exc:
        raise ParameterError(f"{what}: {exc}; use batch packing") from exc


def _cost(params: EncryptionParameters) -> tuple[int, int, int]:
    """What the ladder minimises: ring size, then number of primes, then modulus bits."""
    return params.poly_modulus_degree, len(params.primes), params.total_bits


def _compile_once(model: Model | Chain, chain: Chain, scheme: str, packing: str,
                  calibration: np.ndarray | None, scale_bits: int, weight_bits: int,
                  security: int, poly_modulus_degree: int | None, range_margin: float,
                  name: str | None, layouts: dict[int, list[layout.LayerLayout]],
                  evaluated: tuple[list[np.ndarray], list[np.ndarray]] | None,
                  skip_alignment: str = "auto",
                  memo: dict[Any, Any] | None = None,
                  extra_output_bits: int = 0, guard_bits: int | None = None,
                  fit_rescale: bool = False,
                  cheaper_than: tuple[int, int, int] | None = None) -> Plan | None:
    """One rung of the precision ladder. ``layouts``: single packing's slot layouts by slot
    count (placed from the float weights, whose non-zero pattern holds that of any
    quantisation; filled on first use). ``evaluated``: :meth:`Chain.evaluate` of the
    calibration samples. ``memo``: what the rungs of one ladder compute alike
    (the quantised weights per ``weight_bits``), filled on first use.
    ``extra_output_bits``: added to the output primes (room for noise flooding,
    :mod:`she.runtime.privacy`). ``guard_bits``: single packing's diagonal guard bits (default
    :func:`encode_guard_bits`). ``fit_rescale``: batch packing rounds the weights of every
    hidden layer to at most the shift whose rescale fits one prime
    (:data:`MAX_CT_PRIME_BITS`), instead of keeping exact weights that need two (fewer
    primes: every square, key switch and kernel works on fewer limbs; the rounding is
    counted in the predicted error like any weight quantisation). ``cheaper_than``: a
    :func:`_cost` this rung must beat: None (nothing built, no error measured) when its
    parameters do not."""
    memo = {} if memo is None else memo
    if not 16 <= scale_bits <= 40:
        raise ParameterError(f"scale_bits={scale_bits} is outside the supported range 16..40")
    if not 2 <= weight_bits <= 20:
        raise ParameterError(f"weight_bits={weight_bits} is outside the supported range 2..20")
    if security not in MAX_MODULUS_BITS:
        raise ParameterError(f"security level {security} is not allowed: use 128, 192 or 256")
    model_name = name or (model.name if isinstance(model, Model) else "model")
    notes: list[str] = []

    if calibration is not None:
        assert evaluated is not None
        cal = np.asarray(calibration, dtype=np.float64).reshape(len(calibration), -1)
        inputs, acts = evaluated
        bounds = [np.abs(a).max(axis=0) * range_margin for a in acts]
        samples = _error_samples(inputs, acts)
    else:
        lo, hi = model.input_range if isinstance(model, Model) else (0.0, 1.0)
        with np.errstate(over="ignore", invalid="ignore"):
            bounds = _interval_bounds(chain, lo, hi)
        if not all(np.isfinite(b).all() for b in bounds):
            raise ParameterError(
                "interval arithmetic over the declared input range finds no finite bound on "
                f"the values of this depth-{chain.depth} model; pass calibration samples")
        # One pseudo-sample at every unit's bound.
        values = [np.full((1, chain.source_sizes[0]), max(abs(lo), abs(hi)))]
        values += [b[None] ** 2 for b in bounds[:-1]]
        samples = _error_samples([chain.layer_input(values, k) for k in range(len(bounds))],
                                 [b[None] for b in bounds])
        notes.append("no calibration data: value ranges from interval arithmetic (pessimistic)")

    quantised = _quantised(chain, weight_bits, _rescale_cap(scale_bits) if fit_rescale else None,
                           memo)
    y_out = float(bounds[-1].max(initial=0.0))
    max_prime = MAX_CT_PRIME_BITS - (KEYSWITCH_GUARD_BITS if packing == "single" else 0)
    # Depth of every layer's square (the output layer's: one more than the deepest source it
    # reads). Squares at one depth share their rescale primes, hence one level and scale.
    depths = chain.source_depths[1:] + [chain.depth + 1]
    last = len(chain.layers) - 1
    early: set[int] = set()  # layers whose shallower sources are rescaled early
    if packing == "single":
        guard = encode_guard_bits(weight_bits) if guard_bits is None else guard_bits
        product_bits, shifts = _single_products(quantised, scale_bits, y_out, guard, max_prime,
                                                depths)
    else:
        product_bits = [0] * len(quantised)
        mixed = [k for k in range(len(quantised)) if _mixed(chain, k)]
        own = [f for _, f, _ in quantised]
        needed = [max(f, scale_bits - ALIGN_SLACK_BITS) if k in mixed else f
                  for k, f in enumerate(own)]
        shifts = _depth_shifts(needed, depths)
        if mixed and skip_alignment != "integer":
            # The other way to align a skip: rescale its shallower sources' terms early
            # (one SEAL product and rescale per unit, no extra bits). By default only when
            # the bits it saves make the ring smaller.
            aligned = sum(_modulus_bits(shifts, product_bits, depths, bounds, scale_bits,
                                        y_out, max_prime, packing, extra_output_bits))
            plain = _depth_shifts(own, depths)
            rescaled = sum(_modulus_bits(plain, product_bits, depths, bounds, scale_bits,
                                         y_out, max_prime, packing, extra_output_bits))
            if skip_alignment == "rescale" or (
                    poly_modulus_degree is None and
                    _ring_or_none(rescaled, security) < _ring_or_none(aligned, security)):
                shifts, early = plain, set(mixed)
                notes.append(f"skip connections aligned by early rescales ({rescaled} modulus "
                             f"bits instead of {aligned})")
    while True:
        modulus_bits = _modulus_bits(shifts, product_bits, depths, bounds, scale_bits, y_out,
                                     max_prime, packing, extra_output_bits)
        ring = poly_modulus_degree or _ring_for(sum(modulus_bits), security, chain, scale_bits)
        if packing == "single" and poly_modulus_degree is None:
            ring = max(ring, layout.min_ring_for([(layer.n_out, chain.source_sizes[s])
                                                  for layer in chain.layers
                                                  for s in layer.sources]))
        if packing != "single" or not _widen_a_product_prime(product_bits, depths,
                                                             modulus_bits, ring, max_prime):
            break
    group_parts = {depths[k]: _split_bits(scale_bits + 2 * (0 if product_bits[k] else shifts[k]),
                                          max_prime) for k in range(last)}
    params = EncryptionParameters("ckks", ring, tuple(modulus_bits), security)
    if cheaper_than is not None and _cost(params) >= cheaper_than:
        return None

    layers = []
    for k, (layer, (w_int, f, error)) in enumerate(zip(chain.layers, quantised, strict=True)):
        layers.append(PlanLayer(
            weights=w_int * (1 << (shifts[k] - f)),
            shift=shifts[k],
            product_primes=1 if product_bits[k] else 0,
            bias=layer.bias.copy(),
            out_shape=layer.out_shape,
            rescale_primes=len(group_parts[depths[k]]) if k < last else 0,
            value_bound=float(bounds[k].max(initial=0.0)),
            weight_error=error,
            sources=layer.sources,
            early_sources=tuple(s for s in layer.sources if k in early and
                                chain.source_depths[s] < depths[k] - 1),
        ))
    plan = Plan(model_name, scheme, packing, chain.input_shape, params, 2.0 ** scale_bits,
                layers, 0.0, chain, calibrated=calibration is not None, notes=notes)
    effective = _align(plan, quantised)
    if packing == "batch":
        _fold_vanished_units(plan, effective)
    if packing == "single":
        if params.slots not in layouts:  # refuses layers wider than a ciphertext
            layouts[params.slots] = layout.layouts([layer.matrix for layer in chain.layers],
                                                   params.slots,
                                                   [layer.sources for layer in chain.layers])
        plan._layouts = layouts[params.slots]
    deviation = None
    if calibration is not None:
        deviation = range_margin * _quantisation_deviation(chain, effective, cal, acts[-1])
    _set_predicted_error(plan, effective, samples, deviation)
    if calibration is not None:
        _check_argmax_margin(plan, acts[-1])
    return plan


def _rescale_cap(scale_bits: int) -> int:
    """Batch packing: the largest weight shift ``f`` whose rescale after the square
    (``scale_bits + 2 f`` bits) fits one prime."""
    return (MAX_CT_PRIME_BITS - scale_bits) // 2


class _Quantised(NamedTuple):
    """One layer's :func:`quantise`, as the rungs keep it: the integer weights (sparse ones
    share the index arrays of the layer's canonical matrix), the shift, and the largest
    absolute rounding error (the error matrix itself is recomputed only when the error
    model needs it, :func:`_weight_errors`)."""

    weights: np.ndarray | sp.csr_matrix
    shift: int
    error: float


def _quantised(chain: Chain, weight_bits: int, cap: int | None,
               memo: dict[Any, Any]) -> list[_Quantised]:
    """:func:`quantise` of every layer (hidden layers' shifts at most ``cap``), memoised."""
    key = ("quantised", weight_bits, cap)
    if key not in memo:
        last = len(chain.layers) - 1
        memo[key] = []
        for k, layer in enumerate(chain.layers):
            matrix = layer.matrix
            if sp.issparse(matrix):
                if ("canonical", k) not in memo:
                    memo["canonical", k] = _canonical(matrix)
                matrix = memo["canonical", k].data
            w_int, f, err = quantise(matrix, weight_bits, None if k == last else cap)
            if sp.issparse(layer.matrix):
                w_int = _same_pattern(memo["canonical", k], w_int)
            memo[key].append(_Quantised(w_int, f, float(err.max(initial=0.0))))
    return memo[key]


def _forget_quantised(memo: dict[Any, Any], keep: set[int]) -> None:
    """Drop the memoised quantisations whose ``weight_bits`` no later rung uses."""
    for key in [key for key in memo if key[0] == "quantised" and key[1] not in keep]:
        del memo[key]


def _depth_shifts(needed: list[int], depths: list[int]) -> list[int]:
    """Every layer's shift: the largest needed at its depth (one scale per depth)."""
    per_depth = {d: max(n for n, e in zip(needed, depths, strict=True) if e == d)
                 for d in set(depths)}
    return [per_depth[d] for d in depths]


def _modulus_bits(shifts: list[int], product_bits: list[int], depths: list[int],
                  bounds: list[np.ndarray], scale_bits: int, y_out: float, max_prime: int,
                  packing: str, extra_output_bits: int = 0) -> list[int]:
    """The modulus chain's prime sizes, special prime last: the output primes (with
    ``extra_output_bits`` of room for noise flooding), then the primes dropped at each depth
    (and single packing's products), deepest first."""
    last = len(shifts) - 1
    scale_shifts = [0 if prod else f for f, prod in zip(shifts, product_bits, strict=True)]
    # single packing: one product prime per depth (the layers at one depth drop the same)
    product_parts = {d: b for b, d in zip(product_bits, depths, strict=True) if b}
    group_bits = {depths[k]: scale_bits + 2 * scale_shifts[k] for k in range(last)}
    group_parts = {d: _split_bits(b, max_prime) for d, b in group_bits.items()}
    out_bits = (math.ceil(math.log2(max(y_out, 1.0)) + scale_bits + scale_shifts[-1]) + 3
                + extra_output_bits)
    # Capacity before each rescale: value * scale^2 must fit the primes that remain after it.
    for d in sorted(group_parts):
        bound = max(float(bounds[k].max(initial=0.0)) for k in range(last) if depths[k] == d)
        need = math.log2(max(bound, 1.0)) * 2 + scale_bits + 2
        rest = (out_bits + sum(sum(p) for e, p in group_parts.items() if e > d)
                + sum(b for e, b in product_parts.items() if e > d))
        out_bits += max(0, math.ceil(need - rest))
    ct_bits = list(_split_bits(out_bits, max_prime))
    for d in sorted(set(depths), reverse=True):  # SEAL drops the last prime first
        ct_bits += group_parts.get(d, [])
        ct_bits += [product_parts[d]] if d in product_parts else []
    special = MAX_CT_PRIME_BITS if packing == "single" else max(ct_bits)
    return ct_bits + [special]


def _widen_a_product_prime(product_bits: list[int], depths: list[int], modulus_bits: list[int],
                           ring: int, max_prime: int) -> bool:
    """Single packing: when SEAL cannot find as many distinct primes of some size as the
    chain has for ring ``ring`` (primes must be 1 modulo 2N: at N=16384 only about two have
    20 bits), widen the product primes of that size at one depth by a bit (in place; a
    product prime may have any size, its diagonals are encoded at its value). Returns
    whether one was widened."""
    for bits in sorted({b for b in product_bits if b}):
        try:
            sealapi.CoeffModulus.Create(ring, [bits] * modulus_bits.count(bits))
        except (ValueError, RuntimeError):
            if bits >= max_prime:
                return False
            depth = max(d for b, d in zip(product_bits, depths, strict=True) if b == bits)
            for k, d in enumerate(depths):
                if d == depth:
                    product_bits[k] = bits + 1
            return True
    return False


def _ring_or_none(total_bits: int, security: int) -> float:
    """The smallest ring for ``total_bits`` (infinity when none holds it)."""
    try:
        return smallest_ring(total_bits, security)
    except ParameterError:
        return math.inf


def _mixed(chain: Chain, k: int) -> bool:
    """Whether layer ``k`` reads sources of different depths (a skip connection)."""
    return len({chain.source_depths[s] for s in chain.layers[k].sources}) > 1


def _align(plan: Plan, quantised: list[_Quantised]) -> list[np.ndarray | sp.spmatrix]:
    """Align the scales of the sources each layer adds (skip connections), in place, and
    return every layer's effective real weights (:func:`_weight_errors` gives their
    absolute error).

    A layer works at the level and scale of its reference source (:meth:`Plan.sources`);
    the columns reading source ``s`` get the ratio ``r = scale_ref / scale_s`` folded into
    their integers, ``round(W * 2^F * r)``, so that every term of the integer combination
    lands at the scale ``scale_ref * 2^F``. Where ``r == 1`` (the reference itself, and any
    source at the same depth) this is exact for power-of-two weights; elsewhere the rounding
    (at most ``2^-(F+1) / r`` per weight, ``F`` at least ``scale_bits -``
    :data:`ALIGN_SLACK_BITS`) is the layer's weight error.
    """
    _, scales, refs = plan.sources()
    out = []
    for k, (layer, (w_int, f, _)) in enumerate(zip(plan.layers, quantised, strict=True)):
        real = plan.chain.layers[k].matrix
        # single packing encodes the ratio into the diagonals instead (Plan.diagonal_scales)
        ratios = [1.0 if s in layer.early_sources or plan.packing == "single"
                  else scales[refs[k]] / scales[s] for s in layer.sources]
        if all(r == 1.0 for r in ratios):
            out.append(_same_pattern(w_int, w_int.data * 2.0 ** -f) if sp.issparse(w_int)
                       else w_int * 2.0 ** -f)
            continue
        sizes = [plan.chain.source_sizes[s] for s in layer.sources]
        column = np.repeat(np.asarray(ratios), sizes)
        scaled = sp.csr_matrix(real) @ sp.diags(column * 2.0 ** layer.shift)
        weights = scaled.copy()
        weights.data = np.round(weights.data)
        layer.weights = weights.astype(np.int64)
        effective = weights @ sp.diags(2.0 ** -layer.shift / column)
        error = _weight_errors(real, effective)
        layer.weight_error = float(error.max()) if error.nnz else 0.0
        out.append(effective)
    return out


def _weight_errors(real: np.ndarray | sp.spmatrix, effective: np.ndarray | sp.spmatrix
                   ) -> np.ndarray | sp.csr_matrix:
    """The absolute weight error ``|real - effective|`` of a layer (sparse: entry by entry
    when both have one canonical pattern, which then holds the error, explicit zeros
    included)."""
    if not sp.issparse(effective):
        return np.abs(real - effective)
    real = sp.csr_matrix(real)
    if (effective.has_canonical_format and real.has_canonical_format
            and real.shape == effective.shape and real.nnz == effective.nnz
            and np.array_equal(real.indptr, effective.indptr)
            and np.array_equal(real.indices, effective.indices)):
        return _same_pattern(effective, np.abs(real.data - effective.data))
    return abs(real - effective)


def _ring_for(total_bits: int, security: int, chain: Chain, scale_bits: int) -> int:
    """The smallest ring for ``total_bits``, or an error that says what the plan needs."""
    try:
        return smallest_ring(total_bits, security)
    except ParameterError:
        largest = max(MAX_MODULUS_BITS[security])
        raise ParameterError(
            f"this model needs a {total_bits}-bit coefficient modulus (depth {chain.depth}, "
            f"{scale_bits}-bit scale), but the largest ring N={largest} holds "
            f"{MAX_MODULUS_BITS[security][largest]} bits at {security}-bit security; it would "
            f"need N={2 * largest} or more ({8 * 2 * 2 * largest * total_bits // 60 / 2**20:.0f} "
            "MiB per ciphertext), which SEAL does not offer: reduce the depth (fewer "
            "activations on the longest path) or the scale") from None


def _fold_vanished_units(plan: Plan, effective: list[np.ndarray | sp.spmatrix]) -> None:
    """Batch packing: :func:`fold_constant_units` for the hidden units whose integer weights
    all round to zero (the folded chain has none with zero real weights), in place. Such a
    unit's value is its bias; its square, through the reader's ``effective`` real weights,
    goes into the reader's bias, and its integer columns there become zero. ``effective``
    (the quantised model the error model measures) is unchanged: it computes the same."""
    sizes = plan.chain.source_sizes
    for k, layer in enumerate(plan.layers[:-1]):
        constant = np.flatnonzero(np.asarray(abs(layer.weights).sum(axis=1)).ravel() == 0)
        if not len(constant):
            continue
        squares = layer.bias[constant] ** 2
        for i, reader in enumerate(plan.layers):
            if k + 1 not in reader.sources:
                continue
            columns = sum(sizes[s] for s in reader.sources if s < k + 1) + constant
            reader.bias = reader.bias + np.asarray(effective[i][:, columns] @ squares).ravel()
            reader.weights = _without_columns(reader.weights, columns)


def _fold_vanished_integer_units(weights: list[np.ndarray], biases: list[np.ndarray]) -> None:
    """BFV: :func:`fold_constant_units` on the integer model (a chain), in place, for the
    units whose weights all round to zero (the folded chain has none with zero real
    weights): a unit's integer value is then its integer bias, whose square goes exactly
    into the next layer's integer biases (the function and its bounds are unchanged)."""
    for k in range(len(weights) - 1):
        constant = np.flatnonzero(~weights[k].any(axis=1))
        if len(constant):
            biases[k + 1] += weights[k + 1][:, constant] @ biases[k][constant] ** 2
            weights[k + 1][:, constant] = 0  # in place: the plan's layers hold these arrays


def _compile_bfv(model: Model | Chain, packing: str, calibration: np.ndarray | None,
                 input_bits: int, weight_bits: int, security: int,
                 poly_modulus_degree: int | None, name: str | None) -> Plan:
    if packing != "batch":
        raise ParameterError("BFV runs in batch packing only; use scheme='ckks' for single packing")
    if security not in MAX_MODULUS_BITS:
        raise ParameterError(f"security level {security} is not allowed: use 128, 192 or 256")
    chain = _dense_chain(fold_constant_units(model if isinstance(model, Chain) else lower(model)),
                         "BFV")
    input_range = model.input_range if isinstance(model, Model) else (0.0, 1.0)
    q = bfv.plan_parameters(chain, input_range, input_bits=input_bits, weight_bits=weight_bits,
                            security=security, poly_modulus_degree=poly_modulus_degree,
                            max_prime_bits=MAX_CT_PRIME_BITS)
    layers = [PlanLayer(weights=w, shift=f, bias=b, out_shape=layer.out_shape, rescale_primes=0,
                        value_bound=float(bound.max(initial=0.0)) / scale,
                        weight_error=float(np.abs(layer.matrix - w * 2.0 ** -f).max(initial=0.0)))
              for layer, w, f, b, bound, scale in zip(chain.layers, q["weights"], q["shifts"],
                                                      q["biases"], q["bounds"], q["scales"],
                                                      strict=True)]
    _fold_vanished_integer_units(q["weights"], q["biases"])  # the layers' arrays, errors measured
    notes = [f"BFV: inputs quantised to {input_bits} bits, weights to {weight_bits} bits; the "
             f"{q['params'].plain_modulus.bit_length()}-bit plaintext modulus holds every value "
             "for any input in the declared range, so decryption equals the quantised model exactly"]
    plan = Plan(name or (model.name if isinstance(model, Model) else "model"), "bfv", "batch",
                chain.input_shape, q["params"], q["input_scale"], layers, 0.0, chain,
                calibrated=calibration is not None, notes=notes,
                input_int_range=q["input_int_range"])
    if calibration is not None:
        cal = np.asarray(calibration, dtype=np.float64).reshape(len(calibration), -1)
        if cal.shape[1] != chain.layers[0].n_in:
            raise ParameterError(f"calibration samples must have {chain.layers[0].n_in} features "
                                 f"each, got array of shape {np.shape(calibration)}")
        cal = np.clip(cal, *input_range)
        quantised = plan.run_integers(plan.quantise_inputs(cal)) / plan.output_scale()
        plan.predicted_error = float(np.abs(quantised - chain.run(cal)).max(initial=0.0))
        agree = float(np.mean(quantised.argmax(1) == chain.run(cal).argmax(1)))
        notes.append(f"quantised vs float model on {len(cal)} calibration samples: max |logit "
                     f"difference| {plan.predicted_error:.3g}, argmax agreement {agree:.2%}")
    return plan


def _single_products(quantised: list[tuple[np.ndarray, int, np.ndarray]], scale_bits: int,
                     y_out: float, guard_bits: int, max_prime: int,
                     depths: list[int]) -> tuple[list[int], list[int]]:
    """Single packing: how each layer's plaintext diagonals are scaled.

    Diagonals carry ``f + guard_bits`` bits (``f``: the weights' quantisation shift; the
    largest at the layer's depth, whose squares share their primes). A layer is *fused*
    when the rescale after its square (or, for the last layer, the output prime) can absorb
    those bits within one prime of at most ``max_prime`` bits: its diagonals are encoded at
    ``2^p`` and ``p`` becomes its shift. Otherwise its diagonals are encoded at a prime of
    their own, dropped right after the product (its shift then stays ``f`` and leaves the
    scale alone). ``depths``: the depth of every layer's square.
    Returns (product prime bits or 0, shifts) per layer.
    """
    needed: dict[int, int] = {}
    for (_, f, _), d in zip(quantised, depths, strict=True):
        needed[d] = max(needed.get(d, 0), f + guard_bits)
    products, shifts = [], []
    last = len(quantised) - 1
    for k, (_, f, _) in enumerate(quantised):
        p = needed[depths[k]]
        if k < last:
            fused = scale_bits + 2 * p <= max_prime
        else:
            fused = math.ceil(math.log2(max(y_out, 1.0)) + scale_bits + p) + 3 <= max_prime
        products.append(0 if fused else min(max_prime, max(MIN_PRIME_BITS, p)))
        shifts.append(p if fused else f)
    return products, shifts


def _quantisation_deviation(chain: Chain, effective: list[np.ndarray | sp.spmatrix],
                            cal: np.ndarray, outputs: np.ndarray) -> float:
    """Largest |output change| that weight quantisation causes on the calibration samples
    (``outputs``: the float model's outputs for them)."""
    rounded = Chain([Affine(real, layer.bias, layer.out_shape, layer.sources)
                     for layer, real in zip(chain.layers, effective, strict=True)],
                    chain.input_shape)
    return float(np.abs(rounded.run(cal) - outputs).max(initial=0.0))


def _error_samples(inputs: list[np.ndarray],
                   acts: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The samples the error model follows: ``(inputs, pre)``, each layer's input and
    pre-square values (:meth:`Chain.evaluate`) for at most about :data:`ERROR_SAMPLES` of
    them (those with the largest activations in some hidden layer, where noise is amplified
    most)."""
    if len(inputs[0]) > ERROR_SAMPLES:
        hidden = acts[:-1] or acts
        per = max(1, ERROR_SAMPLES // (2 * len(hidden)))
        keep: set[int] = set()
        for a in hidden:
            for score in (np.abs(a).max(axis=1), np.linalg.norm(a, axis=1)):
                keep.update(np.argsort(score)[-per:].tolist())
        rows = np.array(sorted(keep))
        inputs, acts = [h[rows] for h in inputs], [a[rows] for a in acts]
    return inputs, acts


def _set_predicted_error(plan: Plan, effective: list[np.ndarray | sp.spmatrix],
                         samples: tuple[list[np.ndarray], list[np.ndarray]],
                         deviation: float | None) -> None:
    """Set ``plan.predicted_error``, a 6-sigma estimate of the absolute error of the
    decrypted outputs, and in single packing ``plan.input_drop_bits``: the most low bits of
    the upload the client may round away while that estimate grows by at most
    :data:`DROP_ERROR_SHARE`.

    Error variances are followed per sample (``samples``, see :func:`_error_samples`) and
    per unit: the inputs' noise (fresh encryption; in single packing also the folding of the
    upload and the rounding of its dropped bits), bias
    rounding and, without calibration (``deviation`` is None), weight rounding through each
    affine map; then ``4 y^2`` amplification (``y``: the sample's pre-square value) and
    rescale rounding at each square. In single packing every diagonal entry also carries
    CKKS encoding noise, which reaches an output in proportion to the norm of the sample's
    layer input, and the rescale after the product adds rounding. The server's
    re-randomisation of every result adds a public-key encryption's noise. All of it is linear in
    the noise variances (the square of an error, second order, is left out), so the inputs'
    share is followed apart and choosing the dropped bits costs nothing. ``deviation``: the
    weight-quantisation error measured on calibration samples (with a margin), added.
    ``effective``: every layer's real weights as the plan computes them (their absolute
    rounding error: :func:`_weight_errors`). In a graph the variances are followed per
    source, and a layer's input is its sources' side by side.
    """
    n = plan.params.poly_modulus_degree
    # Coefficient variance of a rounding that also multiplies the secret (a rescale, or a
    # key switch's division by the special prime), and its slot variance times scale^2.
    rounding = (1 + 2 * n / 3) / 12
    rescale = rounding * n
    scales = plan.scales()
    source_scales = plan.sources()[1]
    if plan.packing == "single":
        diag_scales, blocks = plan.diagonal_scales(), plan.layer_blocks()
    inputs, pre = samples
    chain = plan.chain
    samples_n = len(inputs[0])
    # per source: variance from everything but the inputs' noise, and per unit of the latter
    rests = [np.zeros((samples_n, chain.source_sizes[0]))]
    gains = [np.ones((samples_n, chain.source_sizes[0]))]
    for k, real in enumerate(effective):
        squared = _squared(real)
        rest = _applied(squared, chain.layer_input(rests, k))
        gain = _applied(squared, chain.layer_input(gains, k))
        s_out = scales[k][1]
        # bias rounding, and the rounding of every early rescale
        rest = rest + 0.25 / s_out ** 2 + len(plan.layers[k].early_sources) * rescale / s_out ** 2
        if deviation is None:  # rounding errors of known size, their signs independent
            w_err = _weight_errors(chain.layers[k].matrix, real)
            rest = rest + _applied(_squared(w_err), inputs[k] ** 2)
        if plan.packing == "single":  # every block's diagonals, over its source's values
            start = 0
            for s, b in zip(plan.layers[k].sources, blocks[k], strict=True):
                size = chain.source_sizes[s]
                norms = np.sum(inputs[k][:, start:start + size] ** 2, axis=1, keepdims=True)
                rest = rest + n / 12 / diag_scales[b] ** 2 * norms
                start += size
            rest = rest + rescale / s_out ** 2
        if k < plan.squares:
            amplify = 4 * pre[k] ** 2
            rest = amplify * rest + rescale / source_scales[k + 1] ** 2
            gain = amplify * gain
        rests.append(rest)
        gains.append(gain)
    # The server re-randomises every result (she.runtime.privacy): a public-key encryption of zero
    # decrypts to e0 + u e + e1 s (u, s ternary, variance 2/3 per coefficient).
    rest = rest + NOISE_SIGMA ** 2 * (1 + 4 * n / 3) * n / scales[-1][1] ** 2

    # Per-coefficient variance of the inputs' noise: a fresh encryption's, and in single
    # packing the folded upload's (she.io.compact): e + tau(e), one key switch rounding like a
    # rescale, and the dropped bits' rounding.
    fresh = NOISE_SIGMA ** 2 if plan.packing == "batch" else 2 * NOISE_SIGMA ** 2 + rounding

    def predict(drop_bits: int) -> float:
        coefficient = fresh + (4.0 ** drop_bits / 12 if drop_bits else 0.0)
        variance = rest + gain * (coefficient * n / plan.input_scale ** 2)
        return SIGMAS * math.sqrt(float(variance.max(initial=0.0))) + (deviation or 0.0)

    plan.input_drop_bits = 0
    plan.predicted_error = predict(0)
    if plan.packing == "single":
        budget = plan.predicted_error * (1 + DROP_ERROR_SHARE)
        plan.input_drop_bits = max(d for d in range(compact.MAX_DROP_BITS + 1)
                                   if predict(d) <= budget)
        plan.predicted_error = predict(plan.input_drop_bits)
    plan.noise_error = plan.predicted_error - (deviation or 0.0)


def _check_argmax_margin(plan: Plan, outputs: np.ndarray) -> None:
    """Refuse a plan whose predicted error would flip the argmax of calibration samples
    (``outputs``: the float model's outputs for them)."""
    if plan.n_outputs < 2:
        return
    logits = np.sort(outputs, axis=1)
    margins = logits[:, -1] - logits[:, -2]
    at_risk = float(np.mean(margins < plan.predicted_error))
    if at_risk > 0.01:
        raise ParameterError(
            f"predicted output error {plan.predicted_error:.3g} could change the predicted class "
            f"of {at_risk:.1%} of the calibration samples; raise scale_bits or weight_bits"
        )
