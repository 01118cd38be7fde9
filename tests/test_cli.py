"""The ``she`` command line, run in-process."""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import onnx_model
from onnx import helper

import she
from she.cli import main
from she.io import assets


def _run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def test_demo_json_reports_accuracy_agreement_and_latency(capsys):
    code, result = _run_json(capsys, "demo", "--n", "24")
    assert code == 0
    assert result["images"] == 24
    # Recomputed here, against onnxruntime, not taken from what the demo says of itself.
    import onnxruntime as ort

    x, y = assets.demo_samples()
    session = ort.InferenceSession(str(assets.demo_model_path()),
                                   providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: x[:24].astype(np.float32)})[0]
    encrypted = np.asarray(result["encrypted_predictions"])
    assert encrypted.shape == (24,)
    agreement = float(np.mean(encrypted == reference.argmax(1)))
    assert agreement >= 23 / 24
    assert result["agreement"] == agreement
    assert result["encrypted_accuracy"] == float(np.mean(encrypted == y[:24]))
    assert result["plaintext_accuracy"] == float(np.mean(reference.argmax(1) == y[:24]))
    for key in ("encrypt_ms", "evaluate_ms", "decrypt_ms"):
        assert result["per_image"][key] > 0
    assert result["security_bits"] >= 128


def test_inspect_prints_parameters(capsys):
    code, result = _run_json(capsys, "inspect", str(assets.demo_model_path()))
    assert code == 0
    assert result["depth"] == 2
    assert result["total_modulus_bits"] <= result["max_modulus_bits_for_ring"]
    assert result["slots"] == result["poly_modulus_degree"] // 2
    assert len(result["layers"]) == 3
    assert result["estimated_bytes"]["relin_keys"] > 0
    # human-readable form names the ring size and the security bound
    assert main(["inspect", str(assets.demo_model_path())]) == 0
    text = capsys.readouterr().out
    assert "ring size N=" in text and "-bit security" in text


def test_inspect_bfv_names_the_plaintext_modulus_or_the_reason(capsys):
    code, result = _run_json(capsys, "inspect", str(assets.asset_path("shallow_cnn.she.onnx")),
                             "--scheme", "bfv")
    assert code == 0 and result["scheme"] == "bfv" and result["depth"] == 1
    assert 17 <= result["plain_modulus_bits"] <= 60
    assert result["slots"] == result["poly_modulus_degree"]
    # the demo model (depth 2) does not fit a 60-bit plaintext modulus: a clear refusal
    assert main(["inspect", str(assets.demo_model_path()), "--scheme", "bfv"]) == 2
    assert "BFV" in capsys.readouterr().err


def test_offline_file_flow_matches_plaintext(tmp_path, capsys):
    x, _ = assets.demo_samples()
    cal = tmp_path / "cal.npz"
    np.savez(cal, images=x)
    inputs = tmp_path / "in.npy"
    np.save(inputs, x[:5])
    model = str(assets.demo_model_path())
    key, public = tmp_path / "client.key", tmp_path / "public.ctx"
    code, res = _run_json(capsys, "keygen", model, "--calibration", str(cal),
                          "--secret", str(key), "--public", str(public))
    assert code == 0 and key.exists() and public.exists()
    code, _ = _run_json(capsys, "encrypt", "--key", str(key), str(inputs),
                        "-o", str(tmp_path / "in.ct"))
    assert code == 0
    code, _ = _run_json(capsys, "eval", model, "--calibration", str(cal), "--context",
                        str(public), str(tmp_path / "in.ct"), "-o", str(tmp_path / "out.ct"))
    assert code == 0
    code, res = _run_json(capsys, "decrypt", "--key", str(key), str(tmp_path / "out.ct"))
    assert code == 0
    plain = she.load(model).run_plain(x[:5])
    assert res["predictions"] == plain.argmax(1).tolist()
    assert np.allclose(res["logits"], plain, atol=0.05)


def test_public_context_file_has_no_secret_key(tmp_path, capsys):
    x, _ = assets.demo_samples()
    cal = tmp_path / "cal.npz"
    np.savez(cal, images=x)
    key, public = tmp_path / "client.key", tmp_path / "public.ctx"
    assert main(["keygen", str(assets.demo_model_path()), "--calibration", str(cal),
                 "--secret", str(key), "--public", str(public)]) == 0
    msg = she.io.wire.unpack(public.read_bytes(), kind=she.io.wire.KIND_CONTEXT, max_items=3,
                          max_item_bytes=1 << 30)
    import tenseal as ts

    assert not ts.context_from(msg.items[0]).has_secret_key()
    assert ts.context_from(she.io.wire.unpack(key.read_bytes(), kind=she.io.wire.KIND_CONTEXT,
                                           max_items=1, max_item_bytes=1 << 30)
                           .items[0]).has_secret_key()


def test_unsupported_model_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "relu.onnx"
    onnx.save(onnx_model([helper.make_node("Relu", ["input"], ["out"], name="relu_1")],
                         in_shape=(4,), out_shape=(4,), out="out"), path)
    code, result = _run_json(capsys, "inspect", str(path))
    assert code == 2
    assert "relu_1" in result["error"] and "she convert" in result["error"]
    assert main(["inspect", str(path)]) == 2
    assert "relu_1" in capsys.readouterr().err


def test_missing_input_file_is_a_clear_error(tmp_path, capsys):
    code, result = _run_json(capsys, "decrypt", "--key", str(tmp_path / "nope.key"),
                             str(tmp_path / "nope.ct"))
    assert code == 2 and "nope.key" in result["error"]


def test_convert_with_one_choice_fixed_searches_the_others_as_the_default(
        monkeypatch, tmp_path, capsys):
    """``she convert --degree 4`` (no --fast) fine-tunes the search's own setting with that
    degree: two power-of-two terms per weight, as every default candidate has."""
    import pytest

    pytest.importorskip("torch", reason="the converter needs the 'convert' extra")
    import converters
    from she.errors import SheError

    seen = []

    def fake_search(model, x, y, **kwargs):
        seen.append(kwargs["settings"])
        raise SheError("stopped by the test")

    monkeypatch.setattr(converters, "search", fake_search)
    data = tmp_path / "train.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((20, 1, 28, 28), dtype=np.float32),
             y=rng.integers(0, 10, 20))
    for flags, expected in ((["--degree", "4"], (4, True, 2)), (["--no-pow2"], (2, False, 1)),
                            (["--pow2-terms", "3"], (2, True, 3))):
        code = main(["convert", str(assets.asset_path("mlp_cnn.onnx")), "-o",
                     str(tmp_path / "out.onnx"), "--train", str(data), *flags])
        assert code != 0 and "stopped by the test" in capsys.readouterr().err
        (setting,) = seen.pop()
        assert (setting.degree, setting.pow2, setting.pow2_terms) == expected
