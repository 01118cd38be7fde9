"""The benchmark report (``python -m benchmarks --quick``, what CI runs) on real MNIST."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import report


@pytest.fixture(scope="module")
def quick(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("docs")
    return report.main(["--data", str(mnist_dir.parent), "--quick", "--out", str(out)]), out


def _tenseal_pool_threads() -> int:
    """The threads TenSEAL starts for a context made as the baselines make theirs, counted
    in /proc (not taken from the report's own figure)."""
    from benchmarks import tenseal_baseline

    before = len(os.listdir("/proc/self/task"))
    ctx = tenseal_baseline.make_context(galois=False)
    started = len(os.listdir("/proc/self/task")) - before
    del ctx
    return started


def test_every_model_and_mode_is_measured(quick):
    result, _ = quick
    modes = {(r["model"], r["mode"]) for r in result["rows"]}
    for model in ("shipped demo model", "TenSEAL-tutorial network"):
        for mode in ("plaintext (onnxruntime)", "SHE CKKS batch", "SHE CKKS single"):
            assert (model, mode) in modes
    assert ("TenSEAL-tutorial network", "plain TenSEAL, one image") in modes
    shipped = [s for s in report.SUBJECTS if s.original]
    assert result["missing_models"] == []  # every converted model is shipped
    for subject in shipped:  # --quick runs the wide models in plaintext only
        encrypted = () if subject.wide else ("SHE CKKS batch", "SHE CKKS single") + (
            ("SHE BFV batch",) if subject.bfv else ())
        for mode in ("original plaintext (onnxruntime)", "HE-friendly plaintext (onnxruntime)",
                     *encrypted):
            assert (subject.name, mode) in modes
    for r in result["rows"]:
        assert r["images"] >= 2 and 0.0 < r["accuracy"] <= 1.0, r
        if r["images"] >= 500:  # Fashion-MNIST models reach about 90 %, MNIST ones 97-99.5 %
            assert r["accuracy"] >= 0.85, r
        if r["mode"] == "SHE BFV batch":  # exact against the integer-quantised model
            assert r["equals_quantised_model"] is True and r["argmax_agreement"] >= 0.95, r
        elif r["mode"].startswith("SHE"):
            assert r["argmax_agreement"] >= 0.99, r
        if r["mode"].startswith("SHE"):
            assert r["upload_bytes"] > 0 and r["public_key_bytes"] > 0
            # measured in a process of its own; SHE uses every core by default
            assert r["peak_rss_bytes"] > 2 ** 20 and r["threads"] == (os.cpu_count() or 1), r
        if r["mode"].startswith("plain TenSEAL"):  # TenSEAL's default thread pool, measured
            assert r["threads"] == _tenseal_pool_threads(), r
    # Every converted model is checked against its conversion target.
    targets = {t["model"]: t for t in result["conversion_targets"]}
    assert set(targets) == {s.name for s in report.SUBJECTS if s.target_drop is not None}
    for t in targets.values():
        assert t["stages"] and t["conversion_command"].startswith("python -m converters.")
        assert t["drop_points"] == pytest.approx(100 * (t["original"] - t["converted"]))
    # Plaintext rows use the full test set; the encrypted ones what --quick allows.
    assert {r["images"] for r in result["rows"] if "plaintext" in r["mode"]} == {10_000}


def test_files_agree_with_the_run(quick):
    result, out = quick
    saved = json.loads((out / "results" / "benchmarks.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    text = (out / "benchmarks.md").read_text()
    for r in result["rows"]:
        assert f"| {r['model']} | {r['mode']} | {r['images']} | {r['accuracy']:.2%} |" in text
    for p in report.PUBLISHED:
        assert p[0] in text and p[-1] in text
    for t in result["conversion_targets"]:
        assert f"| {t['model']} | {t['original']:.2%} | {t['converted']:.2%} |" in text
    assert "--quick" in text
    for png in ("accuracy_latency.png", "stages.png"):
        assert (out / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_times_come_from_measured_bytes(quick):
    result, _ = quick
    single = next(r for r in result["rows"] if r["mode"] == "SHE CKKS single")
    stages = report.stage_seconds(single, 8.0)  # 8 Mbit/s: one byte per microsecond
    assert stages["upload"] == pytest.approx(single["upload_bytes"] * 1e-6)
    assert stages["evaluate"] == single["eval_s"]["p50"]


def test_update_replaces_only_the_named_models_rows(quick):
    result, _ = quick
    name = "shipped demo model"
    update = {"rows": [dict(r, accuracy=0.5) for r in result["rows"] if r["model"] == name],
              "command": "python -m benchmarks --update x", "date": "2026-11-23T07:00:00+00:00",
              "wall_s": 60.0, "machine": result["machine"]}
    merged = report.merge_update(result, update, [name])
    assert [(r["model"], r["mode"]) for r in merged["rows"]] == \
        [(r["model"], r["mode"]) for r in result["rows"]]
    for old, new in zip(result["rows"], merged["rows"], strict=True):
        assert new["accuracy"] == (0.5 if new["model"] == name else old["accuracy"])
    assert merged["updates"] == [{"models": [name], "modes": list(report.MODE_KINDS),
                                  "command": update["command"], "date": update["date"],
                                  "wall_s": 60.0, "machine": result["machine"]}]
    assert "updates" not in result
    assert "measured again by `python -m benchmarks --update x`" in report.render(merged)


def test_update_of_some_modes_keeps_the_other_rows(quick):
    result, _ = quick
    name = "shipped demo model"
    update = {"rows": [dict(r, accuracy=0.5) for r in result["rows"]
                       if r["model"] == name and r["mode"] == "SHE CKKS single"],
              "command": "python -m benchmarks --update x --modes single",
              "date": "2026-11-23T07:00:00+00:00", "wall_s": 60.0, "machine": result["machine"]}
    merged = report.merge_update(result, update, [name], ("single",))
    assert [(r["model"], r["mode"]) for r in merged["rows"]] == \
        [(r["model"], r["mode"]) for r in result["rows"]]
    for old, new in zip(result["rows"], merged["rows"], strict=True):
        changed = new["model"] == name and new["mode"] == "SHE CKKS single"
        assert new["accuracy"] == (0.5 if changed else old["accuracy"])
    assert "The single rows of shipped demo model were measured again" in report.render(merged)
    # Measured again later: the report names the later update only (the JSON keeps both).
    again = report.merge_update(merged, dict(update, command="python -m benchmarks --update y",
                                             date="2026-11-23T08:00:00+00:00"), [name], ("single",))
    assert len(again["updates"]) == 2
    text = report.render(again)
    assert "--update y" in text and "--update x" not in text
    assert report.mode_kind("SHE BFV batch") == "bfv"
    assert report.mode_kind("plain TenSEAL, one image") == "peer"


def test_accuracy_targets():
    mnist, fashion = (m for m, _ in report.ACCURACY_TARGETS[:2])
    rows = [{"model": mnist, "mode": "SHE CKKS batch", "images": 10_000, "accuracy": 0.9945},
            {"model": mnist, "mode": "SHE CKKS single", "images": 20, "eval_s": {"p50": 5.0}},
            {"model": fashion, "mode": "SHE CKKS batch", "images": 10_000, "accuracy": 0.899},
            {"model": fashion, "mode": "HE-friendly plaintext (onnxruntime)", "images": 10_000,
             "accuracy": 0.95}]
    targets = {t["model"]: t for t in report.accuracy_targets(rows)}
    assert targets[mnist]["met"] and targets[mnist]["single_p50_s"] == 5.0
    assert not targets[fashion]["met"] and targets[fashion]["single_p50_s"] is None
    partial = [dict(rows[0], images=512)]  # not the full test set: never met
    assert report.accuracy_targets(partial)[0]["met"] is False
    refused = [{"model": fashion, "mode": "SHE CKKS single", "reason": "layer 1 too large"}]
    targets = {t["model"]: t for t in report.accuracy_targets(rows, refused)}
    assert targets[fashion]["single_refused"] == "layer 1 too large"
    assert targets[mnist]["single_refused"] is None


def test_render_from_the_saved_json(quick, tmp_path):
    result, out = quick
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "results" / "benchmarks.json").write_text((out / "results" / "benchmarks.json")
                                                       .read_text())
    rendered = report.main(["--render", "--out", str(docs)])
    assert rendered["rows"] == json.loads(json.dumps(result["rows"]))
    assert (docs / "benchmarks.md").read_text() == (out / "benchmarks.md").read_text()


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(1.0, 90.0), (2.0, 95.0), (3.0, 94.0), (0.5, 80.0), (2.0, 93.0), (5.0, 99.0)]
    assert report.pareto_front(points) == [(0.5, 80.0), (1.0, 90.0), (2.0, 95.0), (5.0, 99.0)]


def test_rows_go_to_the_panel_of_their_data_set():
    fashion = next(s.name for s in report.SUBJECTS if s.dataset == "fashion-mnist")
    mnist = next(s.name for s in report.SUBJECTS if s.dataset == "mnist")
    rows = [{"model": fashion, "mode": "SHE CKKS batch"},
            {"model": mnist, "mode": "SHE CKKS single"},
            {"model": "TenSEAL-tutorial network", "mode": "plain TenSEAL, one image"},
            {"model": fashion, "mode": "HE-friendly plaintext (onnxruntime)"}]  # not plotted
    panels = report.panel_rows(rows)
    assert list(panels) == ["mnist", "fashion-mnist"]
    assert panels["fashion-mnist"] == [rows[0]]
    assert panels["mnist"] == [rows[1], rows[2]]
    assert list(report.panel_rows(rows[1:3])) == ["mnist"]  # no empty Fashion-MNIST panel
    with pytest.raises(ValueError, match="data set unknown"):
        report.panel_rows([{"model": "someone's model", "mode": "SHE CKKS batch"}])


def test_pareto_front_of_a_panel_ignores_peers_and_dominated_modes(tmp_path):
    """On a small synthetic report: the front drawn joins SHE's undominated modes only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mnist = "MNIST ReLU CNN (converted)"
    rows = [{"model": mnist, "mode": "SHE CKKS batch", "images": 10_000, "accuracy": 0.99,
             "eval_s_per_image": 0.01},
            {"model": mnist, "mode": "SHE CKKS single", "images": 500, "accuracy": 0.995,
             "eval_s": {"p50": 1.0}},
            {"model": "shipped demo model", "mode": "SHE CKKS single", "images": 500,
             "accuracy": 0.98, "eval_s": {"p50": 2.0}},  # slower and less accurate: off
            {"model": "TenSEAL-tutorial network", "mode": "plain TenSEAL, one image",
             "images": 50, "accuracy": 1.0, "eval_s": {"p50": 3.0}}]  # a peer: never on it
    drawn = []
    original = plt.Axes.step
    plt.Axes.step = lambda self, x, y, **kw: drawn.append(list(zip(x, y, strict=True)))
    try:
        report.accuracy_latency_plot(plt, {"rows": rows, "published": []}, tmp_path / "a.png")
    finally:
        plt.Axes.step = original
    assert drawn == [[(0.01, 99.0), (1.0, 99.5)]]
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_interval_narrows_with_the_sample():
    small, large = report.accuracy_interval(0.998, 500), report.accuracy_interval(0.9945, 10_000)
    assert small[0] < 0.9945 < small[1]  # 99.8 % on 500 images does not beat 99.45 % on 10 000
    assert large[1] - large[0] < (small[1] - small[0]) / 2
    assert report.accuracy_interval(1.0, 5)[1] == 1.0 and report.accuracy_interval(1.0, 5)[0] < 0.6
