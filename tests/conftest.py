"""Shared fixtures.

* ``mnist_dir``: the real MNIST IDX files from ``../shared/data`` (skipped with a reason
  when absent).
* ``toy_model_path`` / ``toy_plan`` / ``toy_server_client``: a small HE-friendly ONNX model
  (Conv -> +c -> square -> Gemm -> square -> Gemm), its plan calibrated on real MNIST
  images, and a server/client pair with the client's evaluation keys loaded. Key generation
  and encryption take seconds, so these (and one encrypted request) are session-scoped.
* ``onnx_model``: the one builder of the suite's hand-made ONNX graphs (input ``"input"``,
  a symbolic batch axis, float32/int64 initializers, opset 17, IR version 9).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
from numpy.typing import ArrayLike
from onnx import TensorProto, helper, numpy_helper

import she
from she.io import wire
from she.io.context import SealBridge
from she.io.data import load_idx_dataset

REPO = Path(__file__).resolve().parents[1]
#: Training images the toy plan is calibrated on.
TOY_CALIBRATION_SAMPLES = 200


def data_root() -> Path:
    """``$SHE_DATA_DIR`` if set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("SHE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def onnx_model(nodes: Sequence[onnx.NodeProto], inits: Mapping[str, ArrayLike] | None = None, *,
               name: str = "g", in_shape: Sequence[int | str] = (1, 28, 28),
               out_shape: Sequence[int | str] = (10,), out: str = "logits", batch: str | None = "N",
               opset: int = 17, ir_version: int = 9, check: bool = True) -> onnx.ModelProto:
    """A hand-built ONNX model: ``nodes`` reading the float input ``"input"`` of shape
    ``(batch, *in_shape)`` and writing the float output ``out`` of shape ``(batch, *out_shape)``
    (no batch axis when ``batch`` is None), default-domain opset ``opset``.

    ``inits`` become initializers in their order, float values stored as float32, integer
    and boolean values as int64. ``check`` runs the ONNX checker on the result."""
    lead = [] if batch is None else [batch]
    graph = helper.make_graph(
        list(nodes), name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [*lead, *in_shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [*lead, *out_shape])],
        [numpy_helper.from_array(_initializer_array(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir_version)
    if check:
        onnx.checker.check_model(model)
    return model


def _initializer_array(value: ArrayLike) -> np.ndarray:
    """``value`` as float32 if it is floating point, as int64 if it is integer or boolean."""
    array = np.asarray(value)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind in "iub":
        return array.astype(np.int64)
    raise TypeError(f"initializer of dtype {array.dtype}: expected floats or integers")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = data_root() / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX files not found in {path}; set SHE_DATA_DIR")
    return path


def toy_model_proto(seed: int = 1234) -> onnx.ModelProto:
    """Conv(1->3, 5x5, stride 2, pads 1) -> Add(c) -> Mul(t, t) -> Flatten -> Gemm(507->16)
    -> Pow(g, 2) -> Gemm(16->10), with seeded random weights."""
    rng = np.random.default_rng(seed)
    inits = {
        "conv_w": rng.normal(0, 0.3, (3, 1, 5, 5)),
        "conv_b": rng.normal(0, 0.1, 3),
        "shift": rng.normal(0, 0.1, (1, 3, 1, 1)),
        "fc1_w": rng.normal(0, 0.1, (16, 3 * 13 * 13)),
        "fc1_b": rng.normal(0, 0.1, 16),
        "two": 2.0,
        "fc2_w": rng.normal(0, 0.1, (16, 10)),
        "fc2_b": rng.normal(0, 0.1, 10),
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], name="conv",
                         kernel_shape=[5, 5], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "shift"], ["t"], name="shift_add"),
        helper.make_node("Mul", ["t", "t"], ["sq"], name="square1"),
        helper.make_node("Flatten", ["sq"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1_w", "fc1_b"], ["g"], name="fc1", transB=1),
        helper.make_node("Pow", ["g", "two"], ["g2"], name="square2"),
        helper.make_node("Gemm", ["g2", "fc2_w", "fc2_b"], ["logits"], name="fc2"),
    ]
    return onnx_model(nodes, inits, name="toy")


@pytest.fixture(scope="session")
def toy_model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy.onnx"
    onnx.save(toy_model_proto(), str(path))
    return path


@pytest.fixture(scope="session")
def toy_calibration(mnist_dir) -> np.ndarray:
    """The first training images of real MNIST, shape (200, 1, 28, 28), float32 in [0, 1]."""
    x, _ = load_idx_dataset(mnist_dir, "train")
    return x[:TOY_CALIBRATION_SAMPLES].copy()


@pytest.fixture(scope="session")
def toy_plan(toy_model_path, toy_calibration) -> she.Plan:
    return she.compile(she.load(toy_model_path), calibration=toy_calibration)


@pytest.fixture(scope="session")
def toy_server_client(toy_plan) -> tuple[she.Server, she.Client, she.EvaluationKeys]:
    server = she.Server(toy_plan)
    client = she.Client(toy_plan.spec())
    keys = server.load_context(client.public_context())
    return server, client, keys


@pytest.fixture(scope="session")
def toy_inputs(toy_calibration) -> np.ndarray:
    """Two real MNIST images: the samples of :func:`toy_request`."""
    return toy_calibration[:2]


@pytest.fixture(scope="session")
def toy_request(toy_server_client, toy_inputs) -> bytes:
    """A valid ciphertext message from the toy client (one ciphertext per pixel)."""
    _, client, _ = toy_server_client
    return client.encrypt(toy_inputs)


@pytest.fixture(scope="session")
def toy_message(toy_request, toy_plan) -> wire.Message:
    """:func:`toy_request` decoded: its metadata and its SEAL-serialised ciphertexts."""
    return wire.unpack(toy_request, kind=wire.KIND_CIPHERTEXTS, max_items=toy_plan.n_inputs,
                       max_item_bytes=1 << 26)


@pytest.fixture(scope="session")
def foreign_ciphertext(toy_plan) -> bytes:
    """A SEAL ciphertext of the same shape as the toy plan's inputs (same ring size, same
    number of RNS limbs) but made under other primes and other keys."""
    params = toy_plan.params
    bits = [30] * len(params.modulus_bits)
    if tuple(bits) == params.modulus_bits:
        bits = [31] * len(bits)
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=bits)
    bridge = SealBridge(ctx)
    try:
        plain = sealapi.Plaintext()
        sealapi.CKKSEncoder(bridge.seal).encode([0.25] * params.slots, toy_plan.input_scale, plain)
        ct = sealapi.Ciphertext(bridge.seal)
        sealapi.Encryptor(bridge.seal, ctx.secret_key().data).encrypt_symmetric(plain, ct)
        return bridge.save_serializable(ct)
    finally:
        bridge.close()


def _small_mnist(mnist_dir: Path, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST averaged down to 7x7 (4x4 blocks), so requests stay small."""
    x, y = load_idx_dataset(mnist_dir, split)
    x = x[:n].reshape(n, 1, 7, 4, 7, 4).mean(axis=(3, 5))
    return x.astype(np.float32), y[:n]


def square_features_model(x: np.ndarray, y: np.ndarray, w1: np.ndarray, b1: np.ndarray,
                          name: str) -> onnx.ModelProto:
    """A depth-1 model on 7x7 inputs: the square features ``(W1 x + b1)^2`` and a
    least-squares readout of the labels ``y`` fitted on ``x``."""
    feats = np.hstack([(x.reshape(len(x), -1) @ w1.T + b1) ** 2, np.ones((len(x), 1))])
    readout = np.linalg.lstsq(feats, np.eye(10)[y], rcond=None)[0]
    inits = {"w1": w1, "b1": b1, "w2": readout[:-1].T, "b2": readout[-1]}
    return onnx_model(
        [helper.make_node("Flatten", ["input"], ["f"]),
         helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1),
         helper.make_node("Mul", ["h", "h"], ["s"]),
         helper.make_node("Gemm", ["s", "w2", "b2"], ["logits"], transB=1)],
        inits, name=name, in_shape=(1, 7, 7))


@pytest.fixture(scope="module")
def small_model(mnist_dir, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A depth-1 model on 7x7 MNIST: random square features, least-squares readout."""
    x, y = _small_mnist(mnist_dir, "train", 5000)
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (24, 49))
    b1 = rng.normal(0, 0.2, 24)
    proto = square_features_model(x, y, w1, b1, "small")
    proto.metadata_props.add(key="she.input_range", value="0,1")
    path = tmp_path_factory.mktemp("model") / "small.onnx"
    onnx.save(proto, path)
    x_test, y_test = _small_mnist(mnist_dir, "test", 64)
    return path, x_test, y_test
