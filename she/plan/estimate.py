"""What running a compiled plan will cost: predicted encrypted latency and server memory,
and whether the plan runs on this machine.

The latency is a *model*, not a measurement: the plan's operation counts times the cost of
one operation measured on the 2-core development machine (docs: DESIGN's hot-loop table, CKKS
N=8192 with 3 ciphertext primes), scaled linearly with the ring size and the number of
primes the operation works on. It ranks settings against each other (the converter's search
reports it for every setting it tries); wall-clock figures come from the benchmarks.

* Batch packing (one sample per slot): every hidden unit is squared once in SEAL (square,
  relinearise, rescale), and every layer is an integer product of its non-zero weights with
  the ciphertexts' coefficient arrays (:mod:`she.runtime.kernels`); the work is shared by all cores.
  The memory is :meth:`~she.plan.compiler.Plan.batch_memory_bytes`; the plan runs when the server
  would accept it (:func:`batch_memory_problem`).
* Single packing (one sample per ciphertext): every multiplied diagonal is one
  ciphertext-plaintext product, every rotation one key switch, every hidden layer one square;
  counted as sequential work. The server keeps the encoded diagonals of every layer.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from .compiler import Plan, _nonzero

#: Seconds of one SEAL operation at the reference parameters (N=8192, 3 primes).
SQUARE_SECONDS = 2.7e-3  # ciphertext x ciphertext, relinearise, rescale
PRODUCT_SECONDS = 1.3e-3  # ciphertext x plaintext vector, with rescale
ROTATION_SECONDS = 25e-3 / 12  # a rotation-sum over 4096 slots is 12 rotations
#: Multiply-adds per second and core of the integer kernel (float64 BLAS over coefficients).
KERNEL_MACS_PER_SECOND = 1e9
REFERENCE_RING, REFERENCE_PRIMES = 8192, 3
#: What the predicted latencies are (reports carry it beside them).
LATENCY_MODEL = (
    "predicted, not measured: operation counts of the compiled plan times per-operation costs "
    f"measured at N={REFERENCE_RING} with {REFERENCE_PRIMES} primes (square "
    f"{SQUARE_SECONDS * 1e3:.1f} ms, plaintext product {PRODUCT_SECONDS * 1e3:.1f} ms, rotation "
    f"{ROTATION_SECONDS * 1e3:.1f} ms, integer kernel {KERNEL_MACS_PER_SECOND:.0e} multiply-adds/s "
    "per core), scaled with ring size x primes; batch work shared by all cores, single "
    "packing counted sequentially")


@dataclass
class Estimate:
    """Predicted cost of one plan (see the module docstring for the model)."""

    packing: str
    poly_modulus_degree: int
    depth: int
    #: server memory while evaluating one request (batch: the engine's peak; single: the
    #: encoded weights)
    memory_bytes: int
    #: predicted server time of one request (a model, not a measurement)
    seconds_per_request: float
    #: the same, per image of a full request
    seconds_per_image: float
    #: why the server would refuse the plan on this machine (None: it runs)
    problem: str | None = None

    @property
    def runs(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "runs": self.runs}

    def describe(self) -> str:
        """One line: latency, memory, ring."""
        per = (f"{self.seconds_per_image * 1e3:.2g} ms per image (full batch)"
               if self.packing == "batch" else f"{self.seconds_per_request:.2g} s per image")
        return (f"{self.packing}: {per}, {self.memory_bytes / 2**30:.2g} GiB, "
                f"N={self.poly_modulus_degree}")


def _factor(ring: int, primes: int) -> float:
    return (ring / REFERENCE_RING) * (primes / REFERENCE_PRIMES)


def estimate(plan: Plan, cores: int | None = None) -> Estimate:
    """Predicted latency and memory of ``plan`` on a server with ``cores`` cores (default:
    this machine's), and whether this machine's server accepts it."""
    ring = plan.params.poly_modulus_degree
    levels = plan.levels()
    if plan.packing == "batch":
        cores = max(1, cores or os.cpu_count() or 1)
        seconds = 0.0
        for k, layer in enumerate(plan.layers):
            seconds += _nonzero(layer.weights) * levels[k] * 2 * ring / KERNEL_MACS_PER_SECOND
            if k < plan.squares:
                seconds += layer.weights.shape[0] * SQUARE_SECONDS * _factor(ring, levels[k])
        seconds /= cores
        return Estimate("batch", ring, plan.depth, plan.batch_memory_bytes(), seconds,
                        seconds / plan.params.slots, batch_memory_problem(plan))
    seconds, diagonals = 0.0, 0
    layouts = plan.layouts()  # one per block: a layer reads one block per source
    for k, blocks in enumerate(plan.layer_blocks()):
        factor = _factor(ring, levels[k])
        for lay in (layouts[b] for b in blocks):
            seconds += (len(lay.used) * PRODUCT_SECONDS
                        + lay.rotations * ROTATION_SECONDS) * factor
            diagonals += len(lay.used) * levels[k]
        if k < plan.squares:
            seconds += SQUARE_SECONDS * factor
    return Estimate("single", ring, plan.depth, diagonals * ring * 8, seconds, seconds)


def batch_memory_problem(plan: Plan) -> str | None:
    """Why one batch of ``plan`` does not fit this machine's memory (None when it does): the
    check the server makes before running a plan, and the converter's search before choosing
    a setting (:func:`estimate`)."""
    need, have = plan.batch_memory_bytes(), physical_memory()
    if have and need > 0.6 * have:
        return (f"one batch of this plan holds about {need / 2**30:.1f} GiB of ciphertexts, more "
                f"than this machine's {have / 2**30:.1f} GiB allow; use single packing, or a "
                "model whose activations act on fewer values (pool before the activation)")
    return None


def physical_memory() -> int:
    """Bytes of physical memory (0 if unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
