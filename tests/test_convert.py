"""The conversion pipeline end to end on a small trained ReLU CNN (needs torch)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import she
from converters.squares import FIXED_PREFIX
from she.io.data import load_idx_dataset
from she.pipeline import encrypted_predict

torch = pytest.importorskip("torch", reason="the converter tests need the 'convert' extra")
nn = torch.nn


def _export(net, path) -> onnx.ModelProto:
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load(str(path))


def _train_briefly(net, x: np.ndarray, y: np.ndarray) -> None:
    """One pass of Adam over 20 000 samples: a real, if modest, classifier."""
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xs, ys = torch.from_numpy(x[:20000]), torch.from_numpy(y[:20000])
    for i in range(0, len(xs), 128):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xs[i:i + 128]), ys[i:i + 128]).backward()
        opt.step()


@pytest.fixture(scope="module")
def trained(mnist_dir):
    torch.manual_seed(0)
    x, y = load_idx_dataset(mnist_dir, "train")
    net = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2, padding=2), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(196, 32),
                        nn.ReLU(), nn.Linear(32, 10))
    _train_briefly(net, x, y)
    xt, yt = load_idx_dataset(mnist_dir, "test")
    return net.eval(), x[:5000], xt[:1000], yt[:1000]


def test_convert_torch_module_with_finetuning(trained, tmp_path):
    import converters

    net, cal, xt, yt = trained
    proto, report = converters.convert(net, cal, eval_x=xt, eval_y=yt, input_shape=(1, 28, 28),
                                       finetune_epochs=2, finetune_lr=2e-3)
    names = [s.name for s in report.stages]
    assert names[0] == "original" and names[-1].startswith("fine-tuned")
    acc = {s.name: s.accuracy for s in report.stages}
    assert acc["cleaned (batch norm folded)"] == acc["original"]  # folding is exact
    # fine-tuning keeps its best epoch on held-out calibration data: no worse than before
    assert len(report.finetune_val_accuracy) == 3  # before, and after each epoch
    assert acc[names[-1]] >= acc[names[-2]] - 0.01
    exported = _export(net, tmp_path / "exported.onnx")
    ops = [n.op_type for n in exported.graph.node]
    assert report.folded_batchnorms == ops.count("BatchNormalization")
    assert report.replaced_pools == ops.count("MaxPool") == 1
    assert report.removed_identities == ops.count("Identity") + ops.count("Dropout")
    assert len(report.activations) == ops.count("Relu") == 2
    assert report.depth == 2 and report.parameters["security_bits"] >= 128
    path = tmp_path / "converted.onnx"
    converters.save_atomically(proto, path)
    onnx.checker.check_model(onnx.load(str(path)))
    model = she.load(path)
    plan = she.compile(model, calibration=cal[:1000])
    # power-of-two layers are integer shift-accumulates: exact, or (where a layer's
    # products of powers of two span more exponents than the compiler keeps) rounded by
    # far less than the predicted error
    assert plan.layers[0].exact
    assert max(layer.weight_error for layer in plan.layers) < 1e-3
    enc, _ = encrypted_predict(plan, xt[:128])
    plain = model.run_plain(xt[:128])
    assert np.mean(enc.argmax(1) == plain.argmax(1)) >= 0.99
    assert np.abs(enc - plain).max() < plan.predicted_error


def test_convert_onnx_file_without_pow2_and_bad_calibration(trained, tmp_path):
    import converters

    net, cal, xt, yt = trained
    path = tmp_path / "relu.onnx"
    _export(net, path)
    proto, report = converters.convert(str(path), cal, pow2=False)
    assert report.pow2_layers == 0 and report.stages[-1].accuracy is None
    she.frontend.model.from_proto(proto)
    with pytest.raises(she.DataError, match="shape"):
        converters.convert(str(path), cal[:, :, :20])
    with pytest.raises(she.DataError, match="labels"):
        converters.convert(str(path), cal, calibration_labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(she.DataError, match="NaN"):
        converters.convert(str(path), np.full_like(cal[:10], np.nan))
    with pytest.raises(she.ModelError, match="not a valid ONNX"):
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not onnx")
        converters.convert(str(bad), cal)


def test_she_convert_cli_leaves_no_partial_file(trained, tmp_path, capsys):
    import json

    from she.cli import main

    net, cal, xt, yt = trained
    src = tmp_path / "relu.onnx"
    _export(net, src)
    np.savez(tmp_path / "cal.npz", x=cal[:2000])
    np.savez(tmp_path / "eval.npz", x=xt[:500], y=yt[:500])
    out = tmp_path / "out.onnx"
    code = main(["convert", str(src), "-o", str(out), "--calibration", str(tmp_path / "cal.npz"),
                 "--eval", str(tmp_path / "eval.npz"), "--max-pool", "average", "--json"])
    assert code == 0 and out.exists()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stages"][0]["accuracy"] > 0.8 and result["depth"] == 2
    assert [o["depth"] for o in result["degree_options"]] == [2, 4, 4]
    missing = tmp_path / "never.onnx"
    np.savez(tmp_path / "bad.npz", x=cal[:10, :, :5])
    assert main(["convert", str(src), "-o", str(missing), "--calibration",
                 str(tmp_path / "bad.npz")]) == 2
    assert not missing.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".she-")] == []


def test_ghn_network_converts_exactly(mnist_dir, tmp_path):
    import converters
    from converters.ghn import GHNConv2d, GHNLinear, Quadratic

    torch.manual_seed(0)
    net = nn.Sequential(GHNConv2d(1, 4, 5, stride=2, padding=2), Quadratic(4, spatial=True),
                        nn.AvgPool2d(2), nn.Flatten(), GHNLinear(196, 32),
                        Quadratic(32, spatial=False), GHNLinear(32, 10)).eval()
    x, _ = load_idx_dataset(mnist_dir, "test")
    x = x[:500]
    with torch.no_grad():
        reference = net(torch.from_numpy(x)).numpy()
    # GHN layers are affine with an analytic bias: the converted model (before power-of-two
    # quantisation) is the torch model, to float precision.
    proto, report = converters.convert(net, x, input_shape=(1, 28, 28), pow2=False)
    assert report.activations == [] and report.folded_batchnorms == 0
    model = she.frontend.model.from_proto(proto)
    assert np.abs(model.run_plain(x) - reference).max() <= 1e-4
    assert np.abs(she.frontend.lowering.lower(model).run(x) - reference).max() <= 1e-4


def test_ghn_double_threshold_becomes_one_quadratic(mnist_dir):
    """GHN's double threshold ``h - k * clip(h)`` is fitted as a whole (a quadratic of
    ``clip`` alone would leave ``h`` beside its own square, which cannot run encrypted)."""
    import converters
    from converters.ghn import DoubleThreshold, GHNConv2d, GHNLinear

    torch.manual_seed(0)
    net = nn.Sequential(GHNConv2d(1, 4, 5, stride=2, padding=2), DoubleThreshold(0.05, 0.2),
                        nn.Flatten(), GHNLinear(784, 10)).eval()
    x, _ = load_idx_dataset(mnist_dir, "test")
    x = x[:500]
    with torch.no_grad():
        reference = net(torch.from_numpy(x)).numpy()
    proto, report = converters.convert(net, x, input_shape=(1, 28, 28), pow2=False)
    assert [a["op_type"] for a in report.activations] == ["Clip (double threshold)"]
    assert report.depth == 1
    model = she.frontend.model.from_proto(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert "Clip" not in ops
    out = model.run_plain(x)
    assert np.mean(out.argmax(1) == reference.argmax(1)) >= 0.9
    assert np.abs(out - reference).max() <= 0.2 * np.abs(reference).max()


def test_degree_three_and_polynomial_max_run_encrypted(mnist_dir):
    """A ReLU CNN (on 14x14 MNIST, to keep the encrypted part small) converted with cubic
    activations and a polynomial max: the report lists every degree's depth, and the
    encrypted model matches its plaintext."""
    import converters

    torch.manual_seed(0)

    def small(split):
        x, y = load_idx_dataset(mnist_dir, split)
        return x.reshape(-1, 1, 14, 2, 14, 2).mean(axis=(3, 5)), y

    x, y = small("train")
    xt, yt = small("test")
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(36, 10))
    _train_briefly(net, x, y)
    proto, report = converters.convert(net.eval(), x[:2000], eval_x=xt[:1000], eval_y=yt[:1000],
                                       input_shape=(1, 14, 14), degree=3,
                                       max_pool="polynomial", finetune_epochs=1,
                                       calibration_labels=y[:2000])
    # relu: 1 level at degree 2, 2 at degree 3 or 4; the 2x2 max: 2 levels
    assert [(o["degree"], o["depth"]) for o in report.degree_options] == [(2, 3), (3, 4), (4, 4)]
    assert report.depth == 4 and report.max_pool == "polynomial"
    acc = {s.name: s.accuracy for s in report.stages}
    assert acc["polynomial pooling"] >= acc["original"] - 0.02
    # fine-tuning trained the coefficients but kept the structural constants (carries,
    # normalisations), which are powers of two
    fixed = [numpy_helper.to_array(i) for i in proto.graph.initializer
             if i.name.startswith(FIXED_PREFIX)]
    assert fixed and all(np.all((v == 0) | (np.log2(np.abs(v) + (v == 0)) % 1 == 0))
                         for v in fixed)
    model = she.frontend.model.from_proto(proto)
    plan = she.compile(model, calibration=x[:1000])
    enc, _ = encrypted_predict(plan, xt[:64])
    plain = model.run_plain(xt[:64])
    assert np.mean(enc.argmax(1) == plain.argmax(1)) >= 0.98
    assert np.abs(enc - plain).max() < plan.predicted_error


def test_fits_use_the_first_fit_samples_of_a_large_calibration_set(trained, mnist_dir):
    """More calibration data than FIT_SAMPLES (the training set for fine-tuning) changes
    nothing before fine-tuning: the activations of a wide model on 60 000 inputs would not
    fit memory."""
    import converters
    from converters.convert import FIT_SAMPLES

    net, cal, _, _ = trained
    x, _ = load_idx_dataset(mnist_dir, "train")
    assert len(cal) <= FIT_SAMPLES < FIT_SAMPLES + 1000 <= len(x)
    few, _ = converters.convert(net, x[:FIT_SAMPLES], input_shape=(1, 28, 28))
    more, _ = converters.convert(net, x[:FIT_SAMPLES + 1000], input_shape=(1, 28, 28))
    assert [n.op_type for n in few.graph.node] == [n.op_type for n in more.graph.node]
    assert len(few.graph.initializer) == len(more.graph.initializer)
    for a, b in zip(few.graph.initializer, more.graph.initializer, strict=True):
        # names differ (a fresh counter): the values, in graph order, do not
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b),
                                      err_msg=a.name)


def test_distillation_losses():
    from converters.finetune import distillation_loss

    rng = np.random.default_rng(3)
    teacher = torch.from_numpy(rng.normal(0, 3, (8, 10)).astype(np.float32))
    student = torch.from_numpy(rng.normal(0, 3, (8, 10)).astype(np.float32))
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(student, teacher).item() > 0.1
    # "kl" compares class probabilities: a per-sample shift of the logits changes nothing
    shifted = teacher + torch.arange(8.0)[:, None]
    assert distillation_loss(shifted, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert distillation_loss(shifted, teacher, "mse").item() == pytest.approx(
        float(np.mean(np.arange(8.0) ** 2)), rel=1e-5)
    # scaled by T^2: at a high temperature the loss tends to the (centred) logits' MSE / 2K
    # instead of vanishing
    hot = distillation_loss(student, teacher, temperature=100.0).item()
    centred = (student - student.mean(1, keepdim=True)) - (teacher - teacher.mean(1, keepdim=True))
    assert hot == pytest.approx(float((centred ** 2).sum(1).mean() / 20), rel=0.05)
    with pytest.raises(ValueError, match="choose one of"):
        distillation_loss(student, teacher, "l1")


@pytest.mark.parametrize("terms", [1, 2, 3])
def test_finetuning_rounds_weights_like_the_pass(terms):
    """The straight-through rounding used in fine-tuning gives the pass's values."""
    from converters.passes import pow2_round
    from converters.torch_graph import pow2_ste

    w = np.random.default_rng(terms).normal(0, 0.2, (6, 3, 5, 5)).astype(np.float32)
    for axis in (0, 1):
        np.testing.assert_array_equal(pow2_ste(torch.from_numpy(w), axis, 4, terms).detach().numpy(),
                                      pow2_round(w, axis, 4, terms))


class _EveryOperator(nn.Module):
    """Uses every operator the converter must accept (issue: Conv, Gemm, MatMul, Add, Sub,
    Mul/Div by constants, Relu, LeakyRelu, Clip, Sigmoid, Tanh, MaxPool, AveragePool,
    GlobalAveragePool, BatchNormalization, Flatten, Reshape, Dropout, Identity, Pad)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 4, 3, stride=2),
                                   nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                                   nn.BatchNorm2d(4),  # after a Conv, export would fold it
                                   nn.Identity(), nn.Conv2d(4, 6, 3, padding=1), nn.Hardtanh(),
                                   nn.AvgPool2d(2), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten())
        self.fc = nn.Linear(6, 16)
        self.w = nn.Parameter(torch.randn(16, 10) * 0.3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.block((x - 0.1307) / 0.3081)
        h = torch.sigmoid(self.fc(h.reshape(h.shape[0], -1))) * 2.0
        h = torch.relu(self.drop(h) @ self.w)
        return torch.tanh(h) + 0.5


@pytest.mark.parametrize("opset", [13, 20])
def test_every_listed_operator_converts(mnist_dir, opset, tmp_path):
    import converters

    torch.manual_seed(0)
    net = _EveryOperator().eval()
    x, _ = load_idx_dataset(mnist_dir, "test")
    x = x[:600]
    path = tmp_path / "every.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), input_names=["input"],
                      output_names=["out"], opset_version=opset, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}})
    exported = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert exported >= {"Conv", "Gemm", "MatMul", "Add", "Sub", "Div", "Mul", "Relu",
                        "LeakyRelu", "Clip", "Sigmoid", "Tanh", "MaxPool", "AveragePool",
                        "GlobalAveragePool", "BatchNormalization", "Flatten", "Reshape", "Pad"}
    proto, report = converters.convert(str(path), x[:500], pow2=False)
    assert len(report.activations) == 6 and report.replaced_pools == 1
    model = she.frontend.model.from_proto(proto)
    with torch.no_grad():
        reference = net(torch.from_numpy(x[500:])).numpy()
    # polynomials replace six activations: close to, not equal to, the original
    assert np.abs(model.run_plain(x[500:]) - reference).max() < 0.25 * np.abs(reference).max()
    plan = she.compile(model, calibration=x[:500])
    assert plan.depth == report.depth == 6
