"""Ordinary trained models, made the way users make them, outside :mod:`converters`.

One trainer per exporter family, each returning the path of an ONNX file written by that
exporter (or, for Keras, by the graph tf2onnx writes, built with ``onnx.helper`` because
TensorFlow is too heavy to install here):

* :func:`torch_mlp` — MLP with BatchNorm, torch's legacy exporter;
* :func:`torch_cnn` — CNN with BatchNorm and MaxPool, legacy exporter;
* :func:`torch_dynamo_cnn` — CNN with an explicit ZeroPad2d and AveragePool, the dynamo
  exporter with external data;
* :func:`sklearn_mlp` — scikit-learn ``MLPClassifier`` through skl2onnx (Softmax, a
  ``label`` output through ArgMax/ArrayFeatureExtractor, ZipMap on or off);
* :func:`keras_cnn` — a Keras-style CNN in tf2onnx's form: NHWC input, Transposes around
  the convolution, a Reshape whose target is computed by Shape/Gather/Concat, Softmax;
* :func:`torch_resnet` and :func:`torch_resnet_dynamo` — small ResNets (an identity and a
  projection block, BatchNorm inside, ReLU after each addition), legacy and dynamo exports.

Used by :mod:`benchmarks.convert_users` (with real data and full training) and by the
converter tests (with a few hundred samples).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: The exporter families, by trainer name.
FAMILIES = ("torch_mlp", "torch_cnn", "torch_dynamo_cnn", "sklearn_mlp", "keras_cnn")
#: Residual networks (:func:`torch_resnet`): the legacy-exported one with a stem MaxPool and
#: ``x.mean``, and the dynamo-exported one with ``AdaptiveAvgPool2d`` and a strided stem.
RESIDUAL_FAMILIES = ("torch_resnet", "torch_resnet_dynamo")


def _train_torch(net, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, lr: float = 2e-3):
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr)
    xs, ys = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        for i in range(0, len(xs), 128):
            idx = order[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()
    return net.eval()


def _legacy_export(net, path: Path, shape: tuple[int, ...], opset: int = 17) -> Path:
    import torch

    torch.onnx.export(net, (torch.zeros(1, *shape),), str(path), input_names=["input"],
                      output_names=["logits"], opset_version=opset, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _dynamo_export(net, path: Path, shape: tuple[int, ...]) -> Path:
    """``net`` exported by torch's dynamo exporter, weights in an external data file."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, *shape),), str(path), dynamo=True,
                          external_data=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return path


def torch_mlp(x: np.ndarray, y: np.ndarray, out: Path, epochs: int = 3, seed: int = 0) -> Path:
    """Flatten -> Linear(784, 128) -> BatchNorm1d -> ReLU -> Linear(128, 10); legacy export."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(x[0].size, 128), nn.BatchNorm1d(128), nn.ReLU(),
                        nn.Linear(128, 10))
    return _legacy_export(_train_torch(net, x, y, epochs, seed), out, x.shape[1:])


def torch_cnn(x: np.ndarray, y: np.ndarray, out: Path, epochs: int = 3, seed: int = 0) -> Path:
    """Two Conv -> BatchNorm -> ReLU -> MaxPool blocks and a Linear; legacy export."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * 7 * 7, 10))
    return _legacy_export(_train_torch(net, x, y, epochs, seed), out, x.shape[1:])


def torch_dynamo_cnn(x: np.ndarray, y: np.ndarray, out: Path, epochs: int = 3,
                     seed: int = 0) -> Path:
    """ZeroPad2d -> Conv -> ReLU -> AvgPool -> Conv -> ReLU -> AvgPool -> Linear; the dynamo
    exporter, weights in an external data file beside the model."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(16 * 7 * 7, 10))
    net = _train_torch(net, x, y, epochs, seed)
    return _dynamo_export(net, out, x.shape[1:])


def sklearn_mlp(x: np.ndarray, y: np.ndarray, out: Path, epochs: int = 10, seed: int = 0,
                zipmap: bool = False) -> Path:
    """scikit-learn ``MLPClassifier(hidden_layer_sizes=(64,))`` on flat inputs, exported by
    skl2onnx (``zipmap`` on: probabilities as a list of dicts)."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    flat = np.asarray(x, np.float32).reshape(len(x), -1)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=epochs, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: few iterations on purpose
        clf.fit(flat, y)
    proto = to_onnx(clf, flat[:1], options={id(clf): {"zipmap": zipmap}}, target_opset=17)
    onnx.save(proto, str(out))
    return out


def keras_cnn(x: np.ndarray, y: np.ndarray, out: Path, epochs: int = 3, seed: int = 0,
              opset: int = 13, channels: int = 8) -> Path:
    """Keras ``Conv2D(channels, 3, relu) -> MaxPooling2D -> Flatten -> Dense(10, softmax)`` on NHWC
    input, trained in torch with the same layout, written as tf2onnx writes it."""
    import torch
    from torch import nn

    class NHWC(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, channels, 3)
            self.dense = nn.Linear(13 * 13 * channels, 10)

        def forward(self, t):
            h = torch.max_pool2d(torch.relu(self.conv(t.permute(0, 3, 1, 2))), 2)
            return self.dense(h.permute(0, 2, 3, 1).flatten(1))  # Keras flattens NHWC

    torch.manual_seed(seed)
    nhwc = np.moveaxis(np.asarray(x, np.float32), 1, -1)
    net = _train_torch(NHWC(), nhwc, y, epochs, seed)
    weights = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    onnx.save(keras_style_graph(weights["conv.weight"], weights["conv.bias"],
                                weights["dense.weight"].T, weights["dense.bias"], opset), str(out))
    return out


def keras_style_graph(conv_w: np.ndarray, conv_b: np.ndarray, dense_w: np.ndarray,
                      dense_b: np.ndarray, opset: int = 13) -> onnx.ModelProto:
    """The graph tf2onnx writes for a Keras Conv2D/ReLU/MaxPooling2D/Flatten/Dense(softmax)
    model with input ``(n, 28, 28, 1)``: ``dense_w`` is Keras's (features, classes)."""
    def init(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    nodes = [
        helper.make_node("Transpose", ["input_1"], ["to_nchw"], perm=[0, 3, 1, 2],
                         name="sequential/conv2d/Conv2D__6"),
        helper.make_node("Conv", ["to_nchw", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3],
                         strides=[1, 1], dilations=[1, 1], name="sequential/conv2d/Conv2D"),
        helper.make_node("Relu", ["conv"], ["relu"], name="sequential/conv2d/Relu"),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2],
                         name="sequential/max_pooling2d/MaxPool"),
        helper.make_node("Transpose", ["pool"], ["to_nhwc"], perm=[0, 2, 3, 1],
                         name="sequential/max_pooling2d/MaxPool__16"),
        helper.make_node("Shape", ["to_nhwc"], ["shape"], name="sequential/flatten/Shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0,
                         name="sequential/flatten/strided_slice"),
        helper.make_node("Concat", ["batch", "features"], ["target"], axis=0,
                         name="sequential/flatten/Reshape/shape"),
        helper.make_node("Reshape", ["to_nhwc", "target"], ["flat"],
                         name="sequential/flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "dense_w"], ["matmul"], name="sequential/dense/MatMul"),
        helper.make_node("Add", ["matmul", "dense_b"], ["logits"], name="sequential/dense/BiasAdd"),
        helper.make_node("Softmax", ["logits"], ["dense"], axis=1 if opset < 13 else -1,
                         name="sequential/dense/Softmax"),
    ]
    inits = [init("conv_w", conv_w), init("conv_b", conv_b), init("dense_w", dense_w),
             init("dense_b", dense_b), init("zero", [0], np.int64),
             init("features", [dense_w.shape[0]], np.int64)]
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__18", 28, 28, 1])],
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__19", dense_w.shape[1]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="tf2onnx", producer_version="1.16.1", ir_version=8)
    onnx.checker.check_model(model)
    return model


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW images as NHWC."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def train(family: str, x: np.ndarray, y: np.ndarray, out: Path, *, epochs: int | None = None,
          seed: int = 0) -> Path:
    """Train and export the ``family`` model (NCHW ``x`` in [0, 1]); returns its path."""
    trainer = {"torch_mlp": torch_mlp, "torch_cnn": torch_cnn,
               "torch_dynamo_cnn": torch_dynamo_cnn, "sklearn_mlp": sklearn_mlp,
               "keras_cnn": keras_cnn, "torch_resnet": torch_resnet,
               "torch_resnet_dynamo": torch_resnet_dynamo}[family]
    kwargs = {} if epochs is None else {"epochs": epochs}
    return trainer(x, y, Path(out), seed=seed, **kwargs)


def _user_resnet(channels: int, pool: str, stem_max_pool: bool):
    """A small ResNet as users write it: stem Conv + BatchNorm + ReLU (optionally MaxPool),
    an identity block and a projection block (1x1 conv, stride 2), BatchNorm inside the
    blocks, ReLU after each addition, global average pooling spelled ``x.mean(dim=(2, 3))``
    (``pool="mean"``) or ``AdaptiveAvgPool2d(1)`` + flatten (``pool="adaptive"``)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.down = None
            if stride != 1 or c_in != c_out:
                self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            stem = [nn.Conv2d(1, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                    nn.ReLU()]
            self.stem = nn.Sequential(*stem, nn.MaxPool2d(2) if stem_max_pool else
                                      nn.Conv2d(channels, channels, 3, 2, 1))
            self.layer1 = Block(channels, channels, 1)
            self.layer2 = Block(channels, 2 * channels, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2 * channels, 10)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            x = x.mean(dim=(2, 3)) if pool == "mean" else torch.flatten(self.pool(x), 1)
            return self.fc(x)

    return ResNet()


def torch_resnet(x: np.ndarray, y: np.ndarray, out: Path, epochs: int = 3, seed: int = 0,
                 channels: int = 8, pool: str = "mean", stem_max_pool: bool = True,
                 dynamo: bool = False) -> Path:
    """:func:`_user_resnet` trained with Adam; the legacy exporter, or the dynamo exporter
    with external data (``dynamo=True``)."""
    import torch

    torch.manual_seed(seed)
    net = _train_torch(_user_resnet(channels, pool, stem_max_pool), x, y, epochs, seed)
    if not dynamo:
        return _legacy_export(net, out, x.shape[1:])
    return _dynamo_export(net, out, x.shape[1:])


def torch_resnet_dynamo(x: np.ndarray, y: np.ndarray, out: Path, epochs: int = 3,
                        seed: int = 0) -> Path:
    """:func:`torch_resnet` without the stem MaxPool (a stride-2 convolution instead),
    ``AdaptiveAvgPool2d(1)`` + flatten, the dynamo exporter with external data."""
    return torch_resnet(x, y, out, epochs, seed, pool="adaptive", stem_max_pool=False,
                        dynamo=True)


def torch_wide_cnn(x: np.ndarray, y: np.ndarray, out: Path, epochs: int = 3,
                   seed: int = 0) -> Path:
    """A wider, deeper plain CNN: four Conv 3x3 + BatchNorm + ReLU layers (64 channels, two
    MaxPools), Linear; legacy export."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def conv(c_in: int, c_out: int, stride: int = 1):
        return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU()]

    net = nn.Sequential(*conv(1, 32, 2), *conv(32, 64), nn.MaxPool2d(2), *conv(64, 64),
                        *conv(64, 64), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 3 * 3, 10))
    return _legacy_export(_train_torch(net, x, y, epochs, seed), out, x.shape[1:])
