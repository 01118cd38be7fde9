"""Server-side execution of a plan on encrypted data (CKKS, batch packing).

Linear layers run in numpy through :mod:`she.kernels` (zero multiplicative depth: the
``2^-shift`` of the integer weights goes into the ciphertext scale). Squares run in SEAL:
square, relinearise, and rescale by the primes the plan assigned to them.
"""

from __future__ import annotations

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .compiler import Plan
from .context import SealBridge
from .kernels import LinearKernel, add_constant
from .sealbytes import RawCiphertext


class Engine:
    """Runs one plan; the integer kernels are prepared once and shared by all sessions."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.primes = plan.params.ciphertext_primes
        self.kernels = [LinearKernel.build(layer.weights, max(self.primes))
                        for layer in plan.layers]

    def run(self, ctx: ts.Context, inputs: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
        """Evaluate the plan.

        Args:
            ctx: the client's public context (relinearisation keys).
            inputs: ``(n_inputs, 2, limbs, N)`` uint64 coefficient arrays at the top level.
            scale: their CKKS scale.

        Returns the output coefficient arrays and their scale.
        """
        bridge = SealBridge(ctx)
        evaluator = sealapi.Evaluator(bridge.seal)
        relin = ctx.relin_keys().data
        try:
            data = inputs
            for k, (layer, kernel) in enumerate(zip(self.plan.layers, self.kernels, strict=True)):
                moduli = self.primes[: data.shape[2]]
                data = kernel.apply(data, moduli)
                scale *= 2.0 ** layer.shift
                add_constant(data, layer.bias, scale, moduli)
                if k < self.plan.depth:
                    data, scale = _square(bridge, evaluator, relin, data, scale,
                                          layer.rescale_primes)
            return data, scale
        finally:
            bridge.close()


def _square(bridge: SealBridge, evaluator: sealapi.Evaluator, relin: sealapi.RelinKeys,
            data: np.ndarray, scale: float, rescales: int) -> tuple[np.ndarray, float]:
    """Square every ciphertext, relinearise, and drop ``rescales`` primes."""
    level = bridge.levels[data.shape[2]]
    out = []
    new_scale = scale
    for unit in data:
        ct = bridge.to_seal(RawCiphertext(unit, scale, level.parms_id))
        evaluator.square_inplace(ct)
        evaluator.relinearize_inplace(ct, relin)
        for _ in range(rescales):
            evaluator.rescale_to_next_inplace(ct)
        raw = bridge.from_seal(ct)
        out.append(raw.data)
        new_scale = raw.scale
    return np.stack(out), new_scale
