"""The default conversion on models made the way users make them (one per exporter family:
scikit-learn through skl2onnx, a tf2onnx-style Keras graph, torch's legacy and dynamo
exporters), on real MNIST data. Each is trained briefly on a few thousand images and
converted by :func:`converters.search` with a small budget; the checks are the issue's:
the drop is within a stated bound, the encrypted run agrees with the converted plaintext,
and the client re-applies the removed tail (probabilities and labels)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import she
from benchmarks import user_models
from she.io.data import load_idx_dataset
from she.pipeline import encrypted_predict

torch = pytest.importorskip("torch", reason="the converter tests need the 'convert' extra")
TRAIN, TEST = 3000, 500
#: Stated bound on the test-accuracy drop of the default conversion of these tiny models
#: trained for seconds on 3000 images (the full-size numbers are in docs/conversion.md).
MAX_TEST_DROP = 0.03


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    x, y = load_idx_dataset(mnist_dir, "train")
    xt, yt = load_idx_dataset(mnist_dir, "test")
    return x[:TRAIN], y[:TRAIN], xt[:TEST], yt[:TEST]


def _original(path, x) -> dict[str, object]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))


def _search(path, x, y, xt, yt, **kwargs):
    import converters

    # bounded by epochs, not by time: the same result on a loaded machine
    return converters.search(str(path), x, y, test_x=xt, test_y=yt, budget=3600, seed=0,
                             max_epochs=3, progress=False, **kwargs)


@pytest.fixture(scope="module")
def sklearn_models(mnist, tmp_path_factory):
    """One MLPClassifier, exported with ZipMap off and on."""
    pytest.importorskip("skl2onnx", reason="needs skl2onnx and scikit-learn (dev extra)")
    x, y, _, _ = mnist
    folder = tmp_path_factory.mktemp("skl")
    return {zipmap: user_models.sklearn_mlp(x, y, folder / f"mlp-{zipmap}.onnx", epochs=20,
                                            zipmap=zipmap) for zipmap in (False, True)}


def _check_tail(client, response, plain, original, n):
    """The client's outputs are the original model's: same names, labels equal where the
    argmax agrees, probabilities the softmax of the (converted) logits."""
    outputs = client.decrypt_outputs(response)
    assert list(outputs) == list(original)
    label_name = next(k for k, v in original.items() if np.asarray(v).ndim == 1)
    labels, original_labels = np.asarray(outputs[label_name]), np.asarray(original[label_name])[:n]
    same = plain.argmax(1) == original_labels
    assert same.mean() > 0.85
    assert np.array_equal(labels[same], original_labels[same])
    probs = client.decrypt(response)
    softmax = np.exp(plain - plain.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    assert probs.shape == plain.shape and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.abs(probs - softmax).max() < 1e-2
    return outputs


@pytest.fixture(scope="module")
def sklearn_converted(sklearn_models, mnist):
    x, y, xt, yt = mnist
    return _search(sklearn_models[False], x.reshape(len(x), -1), y, xt.reshape(len(xt), -1), yt)


def test_sklearn_mlp_converts_and_client_reapplies_its_tail(sklearn_models, sklearn_converted,
                                                            mnist):
    x, y, xt, yt = mnist
    flat, flat_t = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    proto, report = sklearn_converted
    original = _original(sklearn_models[False], flat_t)
    assert report.tail_outputs == list(original) == ["label", "probabilities"]
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Softmax", "ArgMax", "ZipMap", "ArrayFeatureExtractor", "Relu", "Cast"}
    acc = {s.name: s.accuracy for s in report.stages}
    assert acc["original"] - report.stages[-1].accuracy <= MAX_TEST_DROP
    chosen = report.search["trials"][report.search["chosen"]]
    assert chosen["val_accuracy"] >= chosen["val_accuracy_converted"]
    model = she.frontend.model.from_proto(proto)
    plan = she.compile(model, calibration=flat[:500])
    assert "tail" in plan.spec()
    server, client = she.Server(plan), she.Client(plan.spec())
    keys = server.load_context(client.public_context())
    response = server.evaluate(keys, client.encrypt(flat_t[:64]))
    logits = client.decrypt_logits(response)
    plain = model.run_plain(flat_t[:64])
    assert np.mean(logits.argmax(1) == plain.argmax(1)) >= 0.98
    assert np.abs(logits - plain).max() < plan.predicted_error
    _check_tail(client, response, logits, original, 64)


def test_she_decrypt_prints_the_original_label_output(sklearn_models, sklearn_converted, mnist,
                                                     tmp_path, capsys):
    """The offline file flow on a converted skl2onnx model: `she decrypt` prints the labels
    and probabilities the original's tail computes from the decrypted logits."""
    import converters
    from she.cli import main

    x, _, xt, _ = mnist
    flat, flat_t = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    path = tmp_path / "mlp.she.onnx"
    converters.save_atomically(sklearn_converted[0], path)
    np.savez(tmp_path / "cal.npz", x=flat[:300])
    np.save(tmp_path / "in.npy", flat_t[:5])
    key, public = tmp_path / "client.key", tmp_path / "public.ctx"
    compile_args = [str(path), "--calibration", str(tmp_path / "cal.npz")]
    for argv in (["keygen", *compile_args, "--secret", str(key), "--public", str(public)],
                 ["encrypt", "--key", str(key), str(tmp_path / "in.npy"), "-o",
                  str(tmp_path / "in.ct")],
                 ["eval", *compile_args, "--context", str(public), str(tmp_path / "in.ct"),
                  "-o", str(tmp_path / "out.ct")],
                 ["decrypt", "--key", str(key), str(tmp_path / "out.ct"), "--json"]):
        assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain = she.load(path).run_plain(flat_t[:5])
    original = _original(sklearn_models[False], flat_t[:5])
    assert set(result["outputs"]) == {"label", "probabilities"}
    assert result["predictions"] == result["outputs"]["label"] == plain.argmax(1).tolist()
    assert np.allclose(np.sum(result["probabilities"], axis=1), 1, atol=1e-3)
    same = plain.argmax(1) == original["label"]
    assert np.array_equal(np.asarray(result["predictions"])[same], original["label"][same])


def test_sklearn_zipmap_output_comes_back_as_dicts(sklearn_models, mnist):
    import converters

    x, y, xt, _ = mnist
    flat, flat_t = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    proto, report = converters.convert(str(sklearn_models[True]), flat[:1000])
    original = _original(sklearn_models[True], flat_t[:16])
    assert report.tail_outputs == list(original) == ["output_label", "output_probability"]
    model = she.frontend.model.from_proto(proto)
    plan = she.compile(model, calibration=flat[:300])
    client = she.Client(plan.spec())
    logits = model.run_plain(flat_t[:16])
    outputs, probs = client.tail.evaluate(logits)
    assert isinstance(outputs["output_probability"][0], dict)
    assert np.allclose([outputs["output_probability"][i][k] for i in range(16) for k in range(10)],
                       probs.reshape(-1), atol=1e-6)
    same = logits.argmax(1) == original["output_label"]
    assert np.array_equal(outputs["output_label"][same], original["output_label"][same])


def test_keras_style_graph_folds_its_layout_like_its_torch_twin(mnist, tmp_path):
    """A tf2onnx-style graph (NHWC input, Transposes, Shape/Gather/Concat reshape, Softmax)
    converts, and compiles to the ring size and depth of the same network written NCHW."""

    x, y, xt, yt = mnist
    nhwc, nhwc_t = user_models.to_nhwc(x), user_models.to_nhwc(xt)
    path = user_models.keras_cnn(x, y, tmp_path / "keras.onnx", epochs=2, channels=2)
    graph = onnx.load(str(path))
    assert {"Shape", "Gather", "Concat", "Transpose", "Softmax"} <= \
        {n.op_type for n in graph.graph.node}
    proto, report = _search(path, nhwc, y, nhwc_t, yt)
    assert report.folded_shapes == 1 and report.folded_layouts == 1
    assert report.tail_outputs == ["dense"]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Transpose") == 1 and ops[0] == "Transpose"  # only the input's
    assert "Shape" not in ops
    acc = {s.name: s.accuracy for s in report.stages}
    assert acc["original"] - report.stages[-1].accuracy <= MAX_TEST_DROP
    # The twin: the same weights in NCHW, flattened channels-first (what the fold computes).
    twin_dense = onnx.numpy_helper.to_array(
        next(i for i in proto.graph.initializer
             if i.name == next(n for n in proto.graph.node if n.op_type == "MatMul").input[1]))
    model = she.frontend.model.from_proto(proto)
    plan = she.compile(model, calibration=nhwc[:300])
    enc, _ = encrypted_predict(plan, nhwc_t[:32])
    plain = model.run_plain(nhwc_t[:32])
    assert np.mean(enc.argmax(1) == plain.argmax(1)) >= 0.95
    assert np.abs(enc - plain).max() < plan.predicted_error
    # the NCHW twin of the converted model: same depth and ring size
    twin = onnx.ModelProto()
    twin.CopyFrom(proto)
    twin.graph.node.remove(twin.graph.node[0])
    first = twin.graph.node[0]
    first.input[0] = "input_1"
    del twin.graph.input[:]
    twin.graph.input.append(onnx.helper.make_tensor_value_info("input_1", onnx.TensorProto.FLOAT,
                                                               ["n", 1, 28, 28]))
    twin_plan = she.compile(she.frontend.model.from_proto(twin), calibration=x[:300])
    assert (twin_plan.params.poly_modulus_degree, twin_plan.depth) == \
        (plan.params.poly_modulus_degree, plan.depth)
    assert twin_dense.shape[0] == 13 * 13 * 2
    assert np.allclose(she.frontend.model.from_proto(twin).run_plain(x[:50]), model.run_plain(nhwc[:50]),
                       atol=1e-4)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_torch_exports_convert_within_the_stated_drop(exporter, mnist, tmp_path):
    from torch import nn

    x, y, xt, yt = mnist
    torch.manual_seed(0)
    net = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 14 * 14, 10),
                        nn.LogSoftmax(dim=1))
    user_models._train_torch(net, x, y, epochs=3, seed=0)
    path = tmp_path / "net.onnx"
    if exporter == "legacy":
        user_models._legacy_export(net, path, (1, 28, 28), opset=13)
    else:
        torch.onnx.export(net, (torch.zeros(2, 1, 28, 28),), str(path), dynamo=True,
                          external_data=True, input_names=["input"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        assert (tmp_path / "net.onnx.data").exists()
    exported = [n.op_type for n in onnx.load(str(path)).graph.node]
    import converters
    from converters.search import candidates

    # the default search's first (cheapest) setting alone: the later ones cost CPU time here
    first = candidates(converters.prepare(str(path), x[:64])[0])[0]
    proto, report = _search(path, x, y, xt, yt, settings=[first])
    assert report.folded_batchnorms == exported.count("BatchNormalization")
    assert report.replaced_pools == 1
    assert len(report.tail_outputs) == 1  # LogSoftmax, re-applied by the client
    acc = {s.name: s.accuracy for s in report.stages}
    assert acc["original"] > 0.85
    assert acc["original"] - report.stages[-1].accuracy <= MAX_TEST_DROP
    trials = report.search["trials"]
    assert all(t["val_accuracy"] >= t["val_accuracy_converted"] for t in trials)
    model = she.frontend.model.from_proto(proto)
    tail = she.frontend.tail.Tail(model.metadata[she.frontend.tail.METADATA_KEY])
    logits = model.run_plain(xt[:20])
    log_probs = tail.evaluate(logits)[1]
    assert np.allclose(np.exp(log_probs).sum(1), 1, atol=1e-4)
    assert np.array_equal(log_probs.argmax(1), logits.argmax(1))


def test_search_is_reproducible_and_reports_every_setting(mnist, tmp_path):
    from torch import nn

    x, y, xt, yt = mnist
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, 10))
    user_models._train_torch(net, x, y, epochs=1, seed=1)
    path = user_models._legacy_export(net, tmp_path / "mlp.onnx", (1, 28, 28), opset=21)
    import converters

    # an unreachable target: every candidate is tried (budget permitting) and reported
    runs = [converters.search(str(path), x[:1000], y[:1000], max_drop=-50, budget=3600, seed=3,
                              max_epochs=4, progress=False) for _ in range(2)]
    (a, ra), (b, rb) = runs
    assert ra.search["target_met"] is False and "no setting reached" in ra.search["reason"]
    # no max pool, one activation: degree 2 and 4, each with two power-of-two terms and
    # with float weights; every one fine-tuned (in the order of their compiled cost)
    assert [t["description"] for t in ra.search["trials"]] == [
        "degree 2, max pool as average, pow2 2 terms, 4 exponent bits",
        "degree 2, max pool as average, float weights",
        "degree 4, max pool as average, pow2 2 terms, 4 exponent bits",
        "degree 4, max pool as average, float weights"]
    assert sorted(ra.search["order"]) == [0, 1, 2, 3]
    assert all(t["epochs"] >= 1 for t in ra.search["trials"])
    chosen = ra.search["trials"][ra.search["chosen"]]
    assert chosen["val_accuracy"] == max(t["val_accuracy"] for t in ra.search["trials"])
    # same seed, same model (tensor names aside)
    assert [numpy_helper.to_array(i).tolist() for i in a.graph.initializer] == \
        [numpy_helper.to_array(i).tolist() for i in b.graph.initializer]
    assert ra.search["trials"] == [{**t, "seconds": r["seconds"]} for t, r in
                                   zip(rb.search["trials"], ra.search["trials"], strict=True)]


def test_search_falls_back_when_the_best_setting_does_not_compile(mnist, tmp_path, monkeypatch):
    """The most accurate setting is refused by the compiler (simulated): the search keeps
    the next most accurate one that compiles, and says so."""
    import sys

    from torch import nn

    import converters
    from she.errors import ModelError

    x, y, _, _ = mnist
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    user_models._train_torch(net, x, y, epochs=1, seed=1)
    path = user_models._legacy_export(net, tmp_path / "mlp.onnx", (1, 28, 28), opset=17)
    module = sys.modules["converters.search"]
    real_finish, compiled = module.finish, []

    def finish(proto, *args, **kwargs):
        compiled.append(proto)
        if len(compiled) == 1:
            raise ModelError("the converted model does not compile for encryption: refused here")
        return real_finish(proto, *args, **kwargs)

    monkeypatch.setattr(module, "finish", finish)
    proto, report = converters.search(str(path), x[:1000], y[:1000], max_drop=-50, budget=3600,
                                      seed=3, max_epochs=1, progress=False)
    trials = report.search["trials"]
    ranked = sorted(range(len(trials)), key=lambda i: -trials[i]["val_accuracy"])
    assert len(trials) >= 2 and report.search["chosen"] == ranked[1]
    assert len(report.search["not_encryptable"]) == 1
    assert "refused here" in report.search["not_encryptable"][0]
    assert "did not" in report.search["reason"]
    assert compiled[1] is proto and report.parameters is not None


def test_cli_default_convert_reads_image_folders_in_the_models_layout(mnist, tmp_path, capsys):
    from PIL import Image

    from she.cli import main

    x, y, xt, yt = mnist
    for split, images, labels in (("train", x[:600], y[:600]), ("test", xt[:100], yt[:100])):
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp_path / "digits" / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img[0] * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    path = user_models.keras_cnn(x, y, tmp_path / "keras.onnx", epochs=1, channels=2)
    out = tmp_path / "keras.she.onnx"
    code = main(["convert", str(path), "-o", str(out), "--data", str(tmp_path / "digits"),
                 "--budget", "5", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured
    result = json.loads(captured.out)
    assert result["search"]["training_samples"] + result["search"]["validation_samples"] == 600
    assert result["eval_samples"] == 100 and result["stages"][0]["accuracy"] > 0.5
    assert she.load(out).metadata[she.frontend.tail.METADATA_KEY]
    # the human report: every setting with its predicted latency and memory, the choice
    from she.cli import _print_human

    _print_human("convert", result)
    printed = capsys.readouterr().out
    costed = sum(t["batch"] is not None for t in result["search"]["trials"])
    assert costed >= 1 and printed.count("batch: predicted") == costed
    assert "(chosen)" in printed and "latencies predicted, not measured" in printed
    # a model whose input layout cannot be told from the images: a clear error, no file
    bad = tmp_path / "bad.onnx"
    graph = onnx.load(str(path))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value = 700
    del dims[2:]
    onnx.save(graph, str(bad))
    assert main(["convert", str(bad), "-o", str(tmp_path / "never.onnx"), "--data",
                 str(tmp_path / "digits")]) == 2
    assert "cannot" in capsys.readouterr().err and not (tmp_path / "never.onnx").exists()


def test_search_skips_a_setting_whose_plan_does_not_fit_memory(mnist, tmp_path, monkeypatch):
    """Degree-4 activations ahead of a max pool make the batch plan too big for this
    machine (its memory limit lowered here, the server's own check): the search does not
    fine-tune that setting, tries it with the pool moved ahead of the activation, keeps that
    one, says why, and reports predicted latency and memory for every setting."""
    from torch import nn

    import converters
    import she.plan.estimate
    import she.runtime.engine
    from converters.convert import ConversionReport, Settings, he_friendly
    from converters.search import predicted_cost, trial_line

    x, y, _, _ = mnist
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(2 * 14 * 14, 10))
    user_models._train_torch(net, x[:1000], y[:1000], epochs=1, seed=2)
    path = user_models._legacy_export(net, tmp_path / "cnn.onnx", (1, 28, 28))
    deep = Settings(degree=4, pow2_terms=2)
    cleaned = converters.prepare(str(path), x[:500])[0]
    memory, protos = {}, {}
    for setting in (deep, Settings(degree=4, pow2_terms=2, pool_first=True)):
        protos[setting.pool_first] = proto = onnx.ModelProto()
        proto.CopyFrom(cleaned)
        he_friendly(proto, x[:500], setting, ConversionReport())
        memory[setting.pool_first] = predicted_cost(proto, x[:500]).memory_bytes
    assert memory[True] < 0.7 * memory[False]  # the activations act on 4x fewer values
    limit = (memory[True] + memory[False]) / 2 / 0.6  # the server refuses above 0.6 x memory
    monkeypatch.setattr(she.plan.estimate, "physical_memory", lambda: int(limit))
    proto, report = converters.search(str(path), x[:1000], y[:1000], budget=3600, seed=0,
                                      max_epochs=1, progress=False, settings=[deep])
    trials, search = report.search["trials"], report.search
    assert [t["settings"]["pool_first"] for t in trials] == [False, True]
    big, small = trials
    assert big["runs"] is False and big["epochs"] == 0 and "GiB" in big["problem"]
    assert big["batch"]["memory_bytes"] == memory[False]
    # the search's verdict is the server's: its engine refuses that plan with the same words
    big_plan = she.compile(she.frontend.model.from_proto(protos[False]), calibration=x[:500])
    with pytest.raises(she.errors.ParameterError) as refused:
        she.runtime.engine.Engine(big_plan)
    assert str(refused.value) == big["problem"]
    assert small["runs"] is True and small["problem"] is None and small["epochs"] == 1
    assert search["chosen"] == 1 and search["not_runnable"] == [f"{big['description']}: "
                                                                 f"{big['problem']}"]
    assert "not runnable on this machine, so not fine-tuned nor chosen: [1]" in search["reason"]
    for t in trials:  # predicted latency and memory of every setting tried
        assert t["batch"]["seconds_per_request"] > 0 and t["batch"]["memory_bytes"] > 0
        assert "GiB" in trial_line(t) and "ms/image" in trial_line(t)
    # single packing: its predicted latency, or why its compiler refused it
    single = small["single"]
    assert single["packing"] == "single"
    assert single.get("seconds_per_request", 0) > 0 or single["problem"]
    assert "single: " in trial_line(small)
    assert "not measured" in search["latency_model"]
    # the model written is the runnable one: the server accepts its plan under that limit
    plan = she.compile(she.frontend.model.from_proto(proto), calibration=x[:500])
    assert plan.batch_memory_bytes() < 0.6 * limit and she.plan.estimate.batch_memory_problem(plan) is None


def test_fine_tuning_order_follows_what_is_known_before_fine_tuning():
    """Settings no other beats on predicted latency, memory and accuracy before fine-tuning
    first, cheapest first; beaten ones next; then, as listed, those the compiler refuses
    or whose plan does not fit memory before fine-tuning (fine-tuning changes both); last
    a plan too big that has a variant acting on fewer values."""
    from converters.search import Trial, order

    def trial(seconds, memory, accuracy, runs=True):
        cost = None if runs is None else {"seconds_per_image": seconds, "memory_bytes": memory}
        return Trial({}, "", 1, accuracy, accuracy, 0.0, 0, "not fine-tuned", 0.0, batch=cost,
                     runs=runs)

    previews = [trial(2.0, 8, 0.84),  # 0: beaten by 1 (cheaper, smaller, more accurate)
                trial(1.8, 7, 0.88),  # 1: cheapest of the front
                trial(3.0, 10, 0.89),  # 2: dearer but more accurate: on the front
                trial(1.0, 99, 0.95, runs=False),  # 3: does not fit memory
                trial(0.0, 0, 0.94, runs=None),  # 4: refused by the compiler for now
                trial(1.8, 7, 0.88)]  # 5: a tie with 1: neither beats the other
    assert order(previews) == [1, 5, 2, 0, 3, 4]
    assert order(previews, superseded={3}) == [1, 5, 2, 0, 4, 3]
    # float weights only after every power-of-two setting, whatever their cost
    floats = previews + [trial(0.5, 1, 0.99), trial(0.0, 0, 0.99, runs=None)]
    for t in floats[6:]:
        t.settings = {"pow2": False}
    assert order(floats) == [1, 5, 2, 0, 3, 4, 6, 7]


@pytest.fixture(scope="module")
def small_mlp(mnist, tmp_path_factory):
    """A small ordinary MLP trained for one epoch (legacy torch export)."""
    from torch import nn

    x, y, _, _ = mnist
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    user_models._train_torch(net, x, y, epochs=1, seed=2)
    return user_models._legacy_export(net, tmp_path_factory.mktemp("mlp") / "mlp.onnx",
                                      (1, 28, 28), opset=17)


def test_search_that_spends_its_budget_on_previews_still_fine_tunes(mnist, small_mlp):
    """A budget the first preview already exhausts: the other settings are not previewed
    (and reported so), and the first setting still gets one epoch of fine-tuning."""
    import converters

    x, y, _, _ = mnist
    _, report = converters.search(str(small_mlp), x[:1000], y[:1000], max_drop=-50,
                                  budget=1e-3, seed=0, progress=False)
    trials = report.search["trials"]
    assert len(trials) == 1 and report.search["not_previewed"]
    assert trials[0]["epochs"] == 1 and trials[0]["stopped"] == "budget"


def test_setting_within_the_target_fine_tunes_on_while_it_improves(mnist, small_mlp):
    """A target met before any fine-tuning: the setting is still fine-tuned on (early
    stopping on the validation split), and keeps its best epoch."""
    import converters

    x, y, _, _ = mnist
    _, report = converters.search(str(small_mlp), x[:1000], y[:1000], max_drop=50,
                                  budget=3600, seed=0, max_epochs=3, progress=False)
    chosen = report.search["trials"][report.search["chosen"]]
    assert chosen["stopped"].startswith("target, then ")
    assert 1 <= chosen["epochs"] <= 3
    assert chosen["val_accuracy"] >= chosen["val_accuracy_converted"]
    assert len(report.finetune_val_accuracy) == chosen["epochs"] + 1


def test_preview_clock_refuses_compiles_that_would_not_fit_time_or_memory(monkeypatch):
    import importlib
    import time

    search_module = importlib.import_module("converters.search")
    monkeypatch.setattr(search_module, "physical_memory", lambda: 16 * 2**30)
    clock = search_module._PreviewClock(time.monotonic() + 100)
    assert clock.refuses(10_000_000) is None  # no rate measured yet, 1 GiB
    assert "GiB" in clock.refuses(200_000_000)  # about 19 GiB of 16
    clock.record(1_000_000, 20.0)  # 20 s per million weights
    assert clock.refuses(1_000_000) is None
    assert "would take about 200 s" in clock.refuses(10_000_000)
