"""The Concrete ML comparison of the benchmark report (benchmarks.concrete_*).

The adapter's ONNX-to-torch module is checked here against onnxruntime on real MNIST (the
project's torch suffices); the adapter itself runs Concrete ML on a tiny ReLU network only
when a Concrete ML environment is present (``$SHE_CONCRETE_PYTHON`` or ``.venv-concrete``,
see ``python -m benchmarks.concrete_env``), and is skipped with the reason otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import onnx_model
from onnx import TensorProto, helper

from benchmarks import concrete_env, concrete_peer, report
from she.io import assets
from she.io.data import load_idx_dataset

torch = pytest.importorskip("torch", reason="the adapter's torch module needs torch (extra convert)")
from benchmarks.concrete_adapter import OnnxModule  # noqa: E402 - needs torch


def _onnxruntime(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("asset", ["mnist_cnn.onnx", "mlp_cnn.onnx", "tutorial_relu_cnn.onnx",
                                   "tutorial_cnn.onnx", "shallow_cnn.onnx"])
def test_adapter_module_computes_the_shipped_network(asset, mnist_dir):
    """What Concrete ML compiles is the trained network itself: same logits as onnxruntime."""
    proto = onnx.load(str(assets.asset_path(asset)))
    x = load_idx_dataset(mnist_dir, "test")[0][:64]
    with torch.no_grad():
        ours = OnnxModule(proto).eval()(torch.from_numpy(x)).numpy()
    reference = _onnxruntime(proto, x)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_adapter_module_refuses_unsupported_operators():
    node = helper.make_node("Sigmoid", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(ValueError, match="not supported by the Concrete ML adapter.*Sigmoid"):
        OnnxModule(helper.make_model(graph))


def test_missing_environment_is_skipped_with_the_reason(tmp_path, mnist_dir):
    missing = str(tmp_path / "no-such-python")
    python, reason = concrete_env.find(missing)
    assert python is None and "does not exist" in reason
    # the report still renders, with the reason, and how to create the environment
    result = report.run(str(mnist_dir.parent), quick=True, only=["MNIST ReLU MLP (converted)"],
                        modes=("concrete",), concrete_python=missing)
    assert result["rows"] == [] and result["concrete"]["python"] is None
    text = report.render(result)
    assert f"Not measured: {reason}." in text and "python -m benchmarks.concrete_env" in text
    assert report.mode_kind(concrete_peer.ENCRYPTED_MODE) == "concrete"
    assert report.mode_kind(concrete_peer.SIMULATION_MODE) == "concrete"


def _tiny_relu_network(seed: int = 0) -> onnx.ModelProto:
    """Conv(1 -> 2, 7x7, stride 7) -> ReLU -> Flatten -> Gemm(32 -> 10), fixed random weights."""
    rng = np.random.default_rng(seed)
    weights = {"w": rng.normal(0, 0.3, (2, 1, 7, 7)), "b": rng.normal(0, 0.1, 2),
               "fw": rng.normal(0, 0.5, (10, 32)), "fb": rng.normal(0, 0.1, 10)}
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[7, 7],
                              strides=[7, 7]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1)]
    return onnx_model(nodes, weights, name="tiny", batch="n", ir_version=onnx.IR_VERSION)


@pytest.fixture(scope="module")
def concrete_python() -> str:
    python, reason = concrete_env.find()
    if python is None:
        pytest.skip(reason)
    return python


def test_adapter_runs_concrete_ml_on_a_tiny_network(concrete_python, mnist_dir, tmp_path: Path):
    proto = _tiny_relu_network()
    path = tmp_path / "tiny.onnx"
    onnx.save(proto, str(path))
    x, y = load_idx_dataset(mnist_dir, "test")
    x, y = x[:40], y[:40]
    calibration = load_idx_dataset(mnist_dir, "train")[0][:200]
    settings = concrete_peer.ConcreteSettings(calibration_images=200, simulate_images=20,
                                              fhe_images=1, fhe_budget_s=600.0)
    result = concrete_peer.measure(concrete_python, path, calibration, x, y, settings)
    float_pred = _onnxruntime(proto, x).argmax(1)
    # the adapter's float network is the ONNX network (random weights: small logit margins,
    # so 6-bit quantisation flips some argmaxes); the FHE simulation computes the quantised
    # model (p_error ~ 1e-12) and the encrypted run decrypts what the simulation predicts
    assert result["float_predictions"] == float_pred.tolist()
    assert result["float_accuracy"] == pytest.approx(np.mean(float_pred == y))
    assert result["images"] == 40 and result["quantized_agreement_with_float"] >= 0.5
    assert result["simulate_images"] == 20 and result["simulate_agreement_with_quantized"] == 1.0
    assert result["fhe_images"] == 1 and result["fhe_agreement_with_simulation"] == 1.0
    assert result["fhe_unfinished_s"] is None
    assert result["fhe_accuracy"] == float(result["fhe_predictions"][0] == y[0])
    assert result["parameters"]["n_bits"] == 6
    assert result["parameters"]["rounding_threshold_bits"] == 5
    assert 0 < result["parameters"]["global_p_error"] < 1e-3
    assert result["parameters"]["statistics"]["programmable_bootstrap_count"] >= 32  # the ReLUs
    assert result["evaluation_key_bytes"] > 2 ** 20 and result["upload_bytes"] > 0
    assert result["keygen_s"] > 0 and result["server_s"]["p90"] >= result["server_s"]["p50"] > 0
    rows = concrete_peer.rows("tiny", result)
    assert [r["mode"] for r in rows] == [concrete_peer.SIMULATION_MODE,
                                         concrete_peer.ENCRYPTED_MODE]
    assert rows[1]["public_key_bytes"] == result["evaluation_key_bytes"]
    text = "\n".join(concrete_peer.section({"rows": rows}, report._bytes))
    assert "| tiny | Concrete ML | n_bits=6, rounding_threshold_bits=5" in text
