"""The numpy hot loop must be bit-exact against SEAL's own evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from she.io.context import SealBridge
from she.runtime.kernels import LinearKernel, add_constant


@pytest.fixture(scope="module", params=[[34, 30, 36, 36], [60, 52, 60]], ids=["36-bit", "60-bit"])
def seal(request):
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=request.param)
    bridge = SealBridge(ctx)
    encoder = sealapi.CKKSEncoder(bridge.seal)
    encryptor = sealapi.Encryptor(bridge.seal, ctx.secret_key().data)
    evaluator = sealapi.Evaluator(bridge.seal)
    rng = np.random.default_rng(1)
    cts = []
    for _ in range(12):
        plain = sealapi.Plaintext()
        encoder.encode(rng.uniform(-1, 1, 4096).tolist(), 2.0 ** 24, plain)
        ct = sealapi.Ciphertext(bridge.seal)
        encryptor.encrypt_symmetric(plain, ct)
        cts.append(ct)
    raws = [bridge.from_seal(ct) for ct in cts]
    yield ctx, bridge, encoder, evaluator, cts, raws
    bridge.close()


def _seal_combination(seal, weights: np.ndarray) -> list[np.ndarray]:
    """sum_k w[o, k] * ct_k computed by SEAL: multiply_plain by the constant w at scale 1."""
    _, bridge, encoder, evaluator, cts, _ = seal
    outs = []
    for row in weights:
        acc = None
        for w, ct in zip(row, cts, strict=True):
            if w == 0:
                continue
            plain = sealapi.Plaintext()
            encoder.encode(float(w), ct.parms_id(), 1.0, plain)
            term = sealapi.Ciphertext(bridge.seal)
            evaluator.multiply_plain(ct, plain, term)
            if acc is None:
                acc = term
            else:
                evaluator.add_inplace(acc, term)
        outs.append(bridge.from_seal(acc).data)
    return outs


@pytest.mark.parametrize("max_weight", [1, 7, 2 ** 12, 2 ** 20])
def test_linear_combination_is_bit_exact(seal, max_weight):
    *_, raws = seal
    rng = np.random.default_rng(max_weight)
    weights = rng.integers(-max_weight, max_weight + 1, size=(5, len(raws)))
    weights[0, :] = 0
    weights[0, 3] = max_weight  # a sparse row and a single-weight row
    weights[1, 1::2] = 0
    kernel = LinearKernel.build(weights, max(_moduli(seal)))
    q = max(_moduli(seal))
    if max_weight >= 2 ** 20 or q.bit_length() > 40:
        assert kernel.piece_bits(q) < q.bit_length(), "wide sums must take the piecewise path"
    data = np.stack([r.data for r in raws])
    ours = kernel.apply(data, _moduli(seal))
    theirs = _seal_combination(seal, weights)
    for o in range(len(weights)):
        assert np.array_equal(ours[o], theirs[o]), f"row {o}"


def test_sparse_and_dense_paths_agree(seal):
    *_, raws = seal
    data = np.stack([r.data for r in raws])
    rng = np.random.default_rng(5)
    sparse = np.zeros((20, len(raws)), dtype=np.int64)
    sparse[np.arange(20), rng.integers(0, len(raws), 20)] = rng.integers(-64, 64, 20)
    dense = rng.integers(-64, 64, size=(20, len(raws)))
    for weights in (sparse, dense):
        kernel = LinearKernel.build(weights, max(_moduli(seal)))
        expected = np.stack(_seal_combination(seal, weights[:3]))
        assert np.array_equal(kernel.apply(data, _moduli(seal))[:3], expected)


def test_grouped_convolution_path_is_bit_exact(seal, monkeypatch):
    """A convolution's rows read their inputs in groups (one per output position); the
    product by dense groups equals SEAL's, bit for bit, wide weights included."""
    import she.runtime.kernels

    monkeypatch.setattr(she.runtime.kernels, "GROUP_MIN_WEIGHTS", 1)
    *_, raws = seal
    data = np.stack([r.data for r in raws])
    rng = np.random.default_rng(7)
    kernel_taps = rng.integers(-2 ** 20, 2 ** 20, size=(3, 2))  # 3 channels, 2 taps
    weights = np.zeros((3 * 6 + 1, len(raws)), dtype=np.int64)  # a last row without weights
    for position in range(6):
        weights[position::6][:3, 2 * position:2 * position + 2] = kernel_taps
    kernel = LinearKernel.build(weights, max(_moduli(seal)))
    assert kernel.groups is not None and len(kernel.groups) == 6
    ours = kernel.apply(data, _moduli(seal))
    theirs = _seal_combination(seal, weights[:-1])
    for o in range(len(weights) - 1):
        assert np.array_equal(ours[o], theirs[o]), f"row {o}"
    assert not ours[-1].any()


def test_add_constant_matches_seal_add_plain(seal):
    _, bridge, encoder, evaluator, cts, raws = seal
    values = np.array([0.75, -3.2, 0.0, 1e3])
    data = np.stack([r.data for r in raws[:4]]).copy()
    scale = raws[0].scale
    add_constant(data, values, scale, _moduli(seal))
    for i, value in enumerate(values):
        plain = sealapi.Plaintext()
        encoder.encode(float(value), cts[i].parms_id(), scale, plain)
        out = sealapi.Ciphertext(bridge.seal)
        evaluator.add_plain(cts[i], plain, out)
        assert np.array_equal(data[i], bridge.from_seal(out).data), f"value {value}"


def _moduli(seal) -> tuple[int, ...]:
    bridge = seal[1]
    return bridge.levels[max(bridge.levels)].moduli


@pytest.mark.parametrize("bits", [20, 31, 33, 50, 60])
def test_reduction_is_exact_at_the_edges(bits):
    """The float-estimated quotient is corrected: every residue equals Python's ``%``."""
    from she.runtime.kernels import _reduced

    q = (1 << bits) - 1 - 2 * (bits % 7)  # odd, of the given width
    edges = [0, 1, -1, q, -q, q - 1, q + 1, -q - 1, 2 ** 53 - 1, -(2 ** 53 - 1), 2 ** 52,
             (2 ** 53 // q) * q, -(2 ** 53 // q) * q, (2 ** 53 // q) * q - 1]
    rng = np.random.default_rng(bits)
    values = [v for v in edges if abs(v) < 2 ** 53]  # the kernels' exactness bound
    values += [int(v) for v in rng.integers(-(2 ** 53) + 1, 2 ** 53 - 1, 2000)]
    ours = _reduced(np.array(values, dtype=np.float64), q)
    assert [int(v) for v in ours] == [v % q for v in values]
