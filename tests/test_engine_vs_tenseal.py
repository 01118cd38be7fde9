"""The engine benchmark's targets and report for the accurate models (no encryption: the
measurements themselves take minutes; ``python -m benchmarks.engine_vs_tenseal`` runs them)."""

from __future__ import annotations

import json

from benchmarks import engine_vs_tenseal as bench


def _percentiles(p50: float) -> dict[str, float]:
    return {"mean": p50, "p50": p50, "p90": 1.5 * p50}


def _result() -> dict:
    single = {"data": "mnist", "images": 20, "first_server_s": 9.0, "server_s": _percentiles(0.5),
              "public_key_bytes": 5e7, "workers": 2, "rotations": 118, "galois_steps": [1, 28],
              "layer_rotations": [12, 70, 27, 9], "layer_products": [46, 404, 128, 16],
              "layer_limbs": [6, 5, 3, 1], "poly_modulus_degree": 16384,
              "modulus_bits": [50, 60], "depth": 3, "security_bits": 128,
              "predicted_error": 0.1, "accuracy": 1.0, "argmax_agreement": 0.99,
              "max_abs_error": 0.05}
    batch = {"images": 8192, "server_s": 8192 * 0.02, "server_s_per_image": 0.02,
             "peak_rss_bytes": 3 * 2 ** 30, "worker_peak_rss_bytes": 2 ** 30,
             "poly_modulus_degree": 16384, "modulus_bits": [50, 60], "accuracy": 0.99,
             "argmax_agreement": 0.999, "max_abs_error": 1e-3}
    return {"command": "python -m benchmarks.engine_vs_tenseal", "date": "today",
            "machine": {"cores": 2, "cpu": "cpu", "tenseal": "0.3", "she": "0.1"},
            "model": "tutorial_cnn.onnx", "she": {}, "tenseal": {}, "wall_s": 60.0,
            "load_average_start": 3.0, "load_average_end": 4.0,
            "accurate": {"single": {"baseline": {"images": 20, "server_s": _percentiles(3.0),
                                                 "accuracy": 1.0},
                                    "models": {"mnist_fast_cnn.she.onnx": single}},
                         "batch": {"mnist_fast_cnn.she.onnx": batch}}}


def test_accurate_targets_are_same_run_ratios():
    rows = {r["measure"]: r for r in bench.comparisons(_result())}
    latency = rows["accurate mnist_fast_cnn.she.onnx single: baseline p50 / SHE p50"]
    assert latency["ratio"] == 6.0 and latency["target"] == 4 and latency["met"]
    agreement = rows["accurate mnist_fast_cnn.she.onnx single: agreement (%)"]
    assert agreement["ratio"] == 99.0 and not agreement["met"]  # below 99.5 %
    per_image = rows["accurate mnist_fast_cnn.she.onnx batch: server ms per image"]
    assert per_image["ratio"] == 20.0 and not per_image["met"]  # above 10 ms
    assert rows["accurate mnist_fast_cnn.she.onnx batch: peak RSS (GiB)"]["met"]  # 3 GiB < 4


def test_targets_apply_to_the_target_models_only():
    """The deeper models are measured beside the target models, without targets."""
    result = _result()
    for section in (result["accurate"]["single"]["models"], result["accurate"]["batch"]):
        section["mnist_cnn.she.onnx"] = section["mnist_fast_cnn.she.onnx"]
    measures = [r["measure"] for r in bench.comparisons(result)]
    assert not [m for m in measures if "mnist_cnn.she.onnx" in m]
    assert [m for m in measures if "mnist_fast_cnn.she.onnx" in m]
    assert set(bench.TARGET_MODELS) <= set(bench.ACCURATE_MODELS)


def test_a_batch_run_of_some_models_keeps_the_others_rows_with_their_date():
    earlier = _result()
    earlier["accurate"]["batch"]["mnist_cnn.she.onnx"] = dict(
        earlier["accurate"]["batch"]["mnist_fast_cnn.she.onnx"], server_s_per_image=0.08)
    result = _result()
    result["date"] = "2026-11-29T00:00:00+00:00"
    del result["accurate"]["single"]
    result["accurate"]["batch"]["mnist_fast_cnn.she.onnx"]["server_s_per_image"] = 0.009
    bench.keep_earlier(result, dict(earlier, date="2026-11-28T00:00:00+00:00"))
    batch = result["accurate"]["batch"]
    assert batch["mnist_fast_cnn.she.onnx"]["server_s_per_image"] == 0.009  # this run's
    assert batch["mnist_cnn.she.onnx"]["server_s_per_image"] == 0.08
    assert batch["mnist_cnn.she.onnx"]["date"] == "2026-11-28T00:00:00+00:00"
    assert "| `mnist_cnn.she.onnx` | 2026-11-28 | 8192 |" in bench.render(result)


def test_render_shows_the_accurate_models_and_the_load():
    result = _result()
    result["comparisons"] = bench.comparisons(result)
    text = bench.render(result)
    assert "## Accurate models, single packing" in text and "## Accurate models, batch packing" in text
    assert "| `mnist_fast_cnn.she.onnx` (mnist) | 20 | 500 / 750 ms | 6.00 |" in text
    assert "12 / 46 / 6, 70 / 404 / 5" in text
    assert "load average 3.0 at the start, 4.0 at the end" in text
    assert "| accurate mnist_fast_cnn.she.onnx batch: server ms per image | 20.00 | ≤ 10 | **no** |" in text


def test_sections_a_run_skips_are_kept_from_the_earlier_result():
    """A run of the accurate models alone keeps the tutorial network's sections of the
    saved result (the repository's own), naming the run that measured them."""
    earlier = json.loads((bench.DOCS / "results" / "engine_vs_tenseal.json").read_text())
    result = _result()
    result["comparisons"] = bench.comparisons(result)
    bench.keep_earlier(result, earlier)
    assert result["she"]["single"] == earlier["she"]["single"]
    assert result["tenseal"]["batch"] == earlier["tenseal"]["batch"]
    sections = {s for o in result["earlier"] for s in o["sections"]}
    assert {"tutorial network, single", "tutorial network, batch"} <= sections
    measures = {r["measure"] for r in result["comparisons"]}
    assert "single: baseline p50 server latency / SHE p50" in measures
    assert "accurate mnist_fast_cnn.she.onnx single: baseline p50 / SHE p50" in measures
    text = bench.render(result)
    assert "Sections measured earlier (tutorial network, single, tutorial network, batch" in text
    assert "## Single: one image per request" in text and "## Accurate models, single packing" in text


def test_each_kept_section_names_the_run_that_measured_it():
    """An earlier run that itself kept sections of a still earlier one: every section
    kept again is attributed to the run that measured it, not to the last one."""
    first = {"command": "python -m benchmarks.engine_vs_tenseal --single 30", "date": "day 1"}
    saved = json.loads((bench.DOCS / "results" / "engine_vs_tenseal.json").read_text())
    earlier = _result()
    earlier.update(command="python -m benchmarks.engine_vs_tenseal --accurate-single 12",
                   date="day 2", she={"single": saved["she"]["single"]},
                   tenseal={"single": saved["tenseal"]["single"]},
                   earlier={**first, "sections": ["tutorial network, single"]})  # older format
    del earlier["accurate"]["batch"]
    result = _result()
    del result["accurate"]["single"]
    bench.keep_earlier(result, earlier)
    by_section = {s: (o["command"], o["date"]) for o in result["earlier"] for s in o["sections"]}
    assert by_section == {"tutorial network, single": (first["command"], "day 1"),
                          "accurate models, single": (earlier["command"], "day 2")}
    text = bench.render(result)
    assert "Sections measured earlier (tutorial network, single): `python -m benchmarks." \
           "engine_vs_tenseal --single 30` on day 1." in text
    assert "Sections measured earlier (accurate models, single): `python -m benchmarks." \
           "engine_vs_tenseal --accurate-single 12` on day 2." in text


def test_batch_rows_show_cpu_time_load_and_accumulated_memory():
    result = _result()
    result["accurate"]["batch"]["mnist_fast_cnn.she.onnx"].update(
        server_cpu_s=300.0, load_average=[5.0, 7.5], peak_accumulated_bytes=2 ** 30,
        peak_tree_pss_bytes=4.5 * 2 ** 30)
    rows = {r["measure"]: r for r in bench.comparisons(result)}
    tree = rows["accurate mnist_fast_cnn.she.onnx batch: peak memory of the process and its "
                "workers during the evaluation (GiB)"]
    assert tree["ratio"] == 4.5 and not tree["met"]  # above 4 GiB
    result["comparisons"] = list(rows.values())
    assert "| 163.8 s | 20.00 ms | 300 s | 5.0, 7.5 | 3.00 GiB | 4.50 GiB | 1.00 GiB | 1.00 GiB |" \
        in bench.render(result)
    older = _result()  # measured before these were recorded
    older["comparisons"] = bench.comparisons(older)
    assert "| 163.8 s | 20.00 ms | - | - | 3.00 GiB | - | - | 1.00 GiB |" in bench.render(older)


def _hold_memory(mib: int, seconds: float) -> None:
    import time

    import numpy as np

    block = np.ones(mib * 2 ** 17)  # float64: 8 bytes each, written (resident)
    time.sleep(seconds)
    del block


def test_tree_memory_counts_forked_workers():
    """The evaluation memory sums this process and the workers it forks."""
    import multiprocessing
    import os

    before = bench.tree_pss_bytes(os.getpid())
    with bench.TreeMemory(interval=0.05) as memory:
        worker = multiprocessing.get_context("fork").Process(target=_hold_memory, args=(200, 1.0))
        worker.start()
        worker.join()
    assert memory.peak_bytes >= before + 150 * 2 ** 20
