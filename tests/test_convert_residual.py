"""A user's residual network through the default converter, then encrypted.

A tiny ResNet written the way users write one (stem Conv + BatchNorm + ReLU, a basic block
with BatchNorm inside and ReLU after the addition, global average pooling as
``x.mean(dim=(2, 3))``), trained for a few hundred steps on real MNIST (the central 16x16,
so the encrypted run has few input ciphertexts) and exported by torch's legacy exporter
without constant folding (BatchNormalization nodes kept), is converted by
:func:`converters.search.search` with a small budget. Checked: batch norm folded inside the
block, power-of-two rounding does not collapse the model before fine-tuning, the drop on
held-out real images, and the encrypted run against onnxruntime on the converted model.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

import she  # noqa: E402
from converters import onnx_graph as g  # noqa: E402
from converters import passes  # noqa: E402
from converters.convert import Settings, prepare  # noqa: E402
from converters.search import search  # noqa: E402
from she.io.data import load_idx_dataset  # noqa: E402
from she.pipeline import encrypted_predict  # noqa: E402

CHANNELS = 6
#: Points the converted model may lose on held-out images against the original. A tiny
#: model (6 channels pooled to 6 features) fine-tuned for at most 10 epochs on 3600 images
#: in CI: its degree-2 activations alone cost 15.7 points (88.3 -> 72.6 %); measured
#: after fine-tuning: 80.3 % (drop 8.0).
MAX_DROP_POINTS = 10.0
#: Points the power-of-two step (4 exponent bits, 2 terms) may lose against the fitted
#: activations: measured 0.7 (72.6 -> 71.9 %); without compensation through the residual
#: addition, 41.7 (-> 30.9 %, the collapse the issue reports).
POW2_BOUND_POINTS = 5.0


class Block(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(torch.nn.Module):
    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, c, 3, 2, 1, bias=False),
                                        torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        self.block = Block(c)
        self.fc = torch.nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


@contextlib.contextmanager
def _one_thread():
    """Training and fine-tuning with one torch thread: the same numbers on every machine
    (the result of a float reduction depends on how it is split over threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _crop(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, 6:22, 6:22])


@pytest.fixture(scope="module")
def data(mnist_dir):
    x, y = load_idx_dataset(mnist_dir, "train")
    xt, yt = load_idx_dataset(mnist_dir, "test")
    return _crop(x[:4000]), y[:4000].astype(np.int64), _crop(xt[:1000]), yt[:1000]


@pytest.fixture(scope="module")
def user_model(data) -> onnx.ModelProto:
    """1500 Adam steps (about 5 s), then torch's legacy exporter without constant
    folding."""
    x, y, _, _ = data
    with _one_thread():
        return _train_and_export(x, y)


def _train_and_export(x: np.ndarray, y: np.ndarray) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = TinyResNet()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1500):
        idx = torch.randint(0, len(xs), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 16, 16),), buffer, input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      do_constant_folding=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def converted(user_model, data):
    x, y, xt, yt = data
    # the default search's first (cheapest) setting, at most 10 epochs: bounded by work,
    # not by the clock (the budget is far above what 10 epochs take)
    with _one_thread():
        return search(user_model, x, y, test_x=xt, test_y=yt, budget=3600, max_epochs=10,
                      settings=[Settings(pow2_terms=2)], progress=False)


def _accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(g.run(proto, x)[0].argmax(1) == y))


def test_batch_norm_inside_the_block_is_folded(user_model, converted):
    ops = [n.op_type for n in user_model.graph.node]
    assert ops.count("BatchNormalization") == 3 and "ReduceMean" in ops
    proto, report = converted
    assert report.folded_batchnorms == 3
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert not any(n.op_type == "Relu" for n in proto.graph.node)  # after the addition too


def test_power_of_two_rounding_does_not_collapse(user_model, data):
    """The rounding of every activation scale is compensated through the residual addition,
    the next activation and the mean: with the finest weights (6 exponent bits, 3 terms) the
    logits are the fitted model's (the scales' rounding is exact), and with the default's 4
    bits and 2 terms the pow2 step stays within a few points of the fitted activations."""
    x, _, xt, yt = data
    proto, _, _ = prepare(user_model, x[:2000])
    passes.replace_activations(proto, x[:2000])
    fitted = _accuracy(proto, xt, yt)
    fitted_logits = g.run(proto, xt)[0]
    rounded = {}
    for bits, terms in ((4, 2), (6, 3)):
        rounded[bits] = onnx.ModelProto()
        rounded[bits].CopyFrom(proto)
        passes.quantise_pow2(rounded[bits], bits, terms)
        scales = [i for i in rounded[bits].graph.initializer
                  if i.name.startswith(passes.SCALE_PREFIX)]
        assert len(scales) == 3
        for init in scales:  # every activation scale is a power of two
            a = np.abs(numpy_helper.to_array(init))
            assert np.array_equal(np.log2(a), np.round(np.log2(a)))
    assert _accuracy(rounded[4], xt, yt) >= fitted - POW2_BOUND_POINTS / 100
    fine = g.run(rounded[6], xt)[0]
    assert np.abs(fine - fitted_logits).max() < 0.05 * np.abs(fitted_logits).max()
    assert np.mean(fine.argmax(1) == fitted_logits.argmax(1)) >= 0.97


def test_default_conversion_meets_its_drop_on_held_out_images(user_model, converted, data):
    _, _, xt, yt = data
    proto, report = converted
    original = _accuracy(user_model, xt, yt)
    assert original > 0.8
    assert _accuracy(proto, xt, yt) >= original - MAX_DROP_POINTS / 100
    assert report.search["trials"] and report.depth == 3


def test_encrypted_run_agrees_with_the_converted_plaintext(converted, data):
    """CKKS batch packing (N=16384: depth 3 needs more than N=8192's 218 bits): within
    the plan's predicted error of onnxruntime on the converted model, and the same class
    for every image."""
    proto, _ = converted
    x, _, xt, _ = data
    plan = she.compile(she.frontend.model.from_proto(proto, "tiny_resnet"), calibration=x[:500])
    assert plan.params.poly_modulus_degree <= 16384 and plan.params.security >= 128
    enc, _ = encrypted_predict(plan, xt[:64])
    plain = g.run(proto, xt[:64])[0]
    assert np.abs(enc - plain).max() < plan.predicted_error
    assert np.mean(enc.argmax(1) == plain.argmax(1)) == 1.0


def test_scale_rounding_is_exact_through_identity_and_projection_blocks(monkeypatch,
                                                                        mnist_dir):
    """benchmarks.user_models' ResNet (stem MaxPool, an identity and a projection block,
    ``x.mean``), untrained: with the weights' own rounding switched off, rounding the five
    activation scales to powers of two leaves the logits unchanged (float32 rounding)."""
    from benchmarks.user_models import _user_resnet

    torch.manual_seed(1)
    net = _user_resnet(4, "mean", True).eval()
    x, _ = load_idx_dataset(mnist_dir, "test")
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), buffer, input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto, _, _ = prepare(onnx.load_from_string(buffer.getvalue()), x[:300])
    passes.replace_pooling(proto, "average")
    passes.replace_activations(proto, x[:300])
    fitted = g.run(proto, x[300:400])[0]
    monkeypatch.setattr(passes, "pow2_round", lambda w, axis, bits, terms=1: w)
    before = [numpy_helper.to_array(i) for i in proto.graph.initializer
              if i.name.startswith(passes.SCALE_PREFIX)]
    passes.quantise_pow2(proto)
    after = [numpy_helper.to_array(i) for i in proto.graph.initializer
             if i.name.startswith(passes.SCALE_PREFIX)]
    assert len(after) == 5 and any(not np.allclose(a, b) for a, b in zip(after, before,
                                                                          strict=True))
    rounded = g.run(proto, x[300:400])[0]
    assert np.abs(rounded - fitted).max() <= 1e-4 * np.abs(fitted).max()


def test_degree_4_only_where_the_degree_2_fit_is_worst(user_model, data):
    """The search's mixed candidate: degree 4 at the activation(s) whose degree-2 fit errs
    most (here the one after the addition, whose inputs span the widest range), degree 2
    elsewhere: one level more than degree 2 (not twice the depth), a closer fit there, and
    a plan that compiles."""
    from converters.convert import ConversionReport, he_friendly, square_depth
    from converters.search import candidates, worst_fitted

    x, _, xt, _ = data
    proto, _, _ = prepare(user_model, x[:2000])
    worst = worst_fitted(proto, x[:2000])
    two = onnx.ModelProto()
    two.CopyFrom(proto)
    fitted = {f.node: f for f in passes.replace_activations(two, x[:2000])}
    assert worst and set(worst) <= set(fitted)
    assert max(fitted, key=lambda name: fitted[name].rmse) in worst
    mixed = Settings(degree4_at=worst, pow2_terms=2)
    assert mixed in candidates(proto, x[:2000])
    assert Settings(degree4_at=worst, pow2=False) in candidates(proto, x[:2000])
    assert all(not s.degree4_at for s in candidates(proto))  # needs calibration data
    four = onnx.ModelProto()
    four.CopyFrom(proto)
    report = ConversionReport()
    he_friendly(four, x[:2000], replace(mixed, pow2=False), report)
    degrees = {a["node"]: a["degree"] for a in report.activations}
    assert {n for n, d in degrees.items() if d == 4} == set(worst)
    assert square_depth(four) == square_depth(two) + 1
    for a in report.activations:
        if a["node"] in worst:
            assert a["rmse"] < 0.8 * fitted[a["node"]].rmse
    assert "(4 at " in mixed.describe()
    plan = she.compile(she.frontend.model.from_proto(four), calibration=x[:300])
    assert plan.params.poly_modulus_degree <= 16384
    with pytest.raises(she.errors.ParameterError, match="no activation named"):
        passes.replace_activations(two, x[:100], degrees={"nowhere": 4})
