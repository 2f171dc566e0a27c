"""`leukoscope export` and `predict --backend`, end to end."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from leukoscope.bundle import read_bundle_info
from tests.export.conftest import invoke

pytest.importorskip("onnxruntime")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_export_with_check_then_predict_on_both_backends(trained: dict[str, Path], synthetic_root: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "exported"
    result = invoke("export", "--bundle", trained["abas_cnn"], "--format", "onnx", "--out", out,
                    "--check", synthetic_root, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out) and (out / "model.onnx").is_file()
    assert "parity on 96 images: largest |p_torch - p_" in result.output  # p_openvino where installed (auto)
    assert "top class agreement 100.00%" in result.output and "accuracy on 96 labelled images: torch" in result.output
    csvs = {}
    for backend in ("torch", "onnxruntime", "auto"):
        csvs[backend] = tmp_path / f"{backend}.csv"
        result = invoke("predict", "--bundle", out, synthetic_root / "blast", "--out", csvs[backend],
                        "--backend", backend, "--threads", "1")
        assert result.exit_code == 0, result.output
        assert ("exported float32 graph" in result.output) == (backend != "torch")  # what runs it is said
    torch_rows, onnx_rows, auto_rows = (_rows(csvs[b]) for b in ("torch", "onnxruntime", "auto"))
    assert list(onnx_rows[0]) == list(torch_rows[0])  # the same columns, OOD included
    assert [r["top_class"] for r in onnx_rows] == [r["top_class"] for r in torch_rows]
    assert [r["source"] for r in onnx_rows] == [r["source"] for r in torch_rows]
    # auto: openvino where installed (the same graph; float rounding apart), else onnxruntime
    assert [r["top_class"] for r in auto_rows] == [r["top_class"] for r in onnx_rows]
    for a, b in zip(onnx_rows, torch_rows):
        assert abs(float(a["confidence"]) - float(b["confidence"])) < 1e-4 and a["ood_score"] != ""


def test_default_out_is_beside_the_bundle_and_not_overwritten(trained: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    bundle = shutil.copytree(trained["mobilenet_v3_small"], tmp_path / "bundle")
    result = invoke("export", "--bundle", bundle)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bundle-onnx" / "model.onnx").is_file()
    again = invoke("export", "--bundle", bundle)
    assert again.exit_code == 2 and "bundle-onnx already exists and is not empty" in again.output
    in_place = invoke("export", "--bundle", bundle, "--out", bundle)  # the bundle's own folder: graph added
    assert in_place.exit_code == 0, in_place.output
    assert json.loads((bundle / "bundle.json").read_text())["export"]["file"] == "model.onnx"


def test_torch_bundle_with_onnxruntime_backend_says_to_export(trained: dict[str, Path], synthetic_root: Path,
                                                             tmp_path: Path) -> None:
    result = invoke("predict", "--bundle", trained["abas_cnn"], synthetic_root / "blast", "--out",
                    tmp_path / "p.csv", "--backend", "onnxruntime")
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "has no ONNX graph: run `leukoscope export --bundle" in said
    # the export writes <bundle>-onnx beside it: following the advice and running the same command again
    # failed the same way
    assert f"(it writes {trained['abas_cnn']}-onnx) and give that folder as the bundle" in said
    bad = invoke("predict", "--bundle", trained["abas_cnn"], synthetic_root / "blast", "--backend", "tensorrt")
    assert bad.exit_code == 2 and "--backend must be one of auto, torch, onnxruntime, openvino" in bad.output


def test_explain_on_another_backend_loads_the_torch_model_for_grad_cam(exported: dict[str, Path], synthetic_root: Path,
                                                                      tmp_path: Path) -> None:
    images = sorted((synthetic_root / "blast").glob("*.png"))[:3]
    result = invoke("predict", "--bundle", exported["abas_cnn"], *images, "--out", tmp_path / "p.csv",
                    "--backend", "onnxruntime", "--explain", tmp_path / "cam", "--threads", "1")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "p.csv")
    overlays = sorted(path.name for path in (tmp_path / "cam").glob("*.png"))
    # one overlay per image, for the class the onnxruntime backend predicted
    assert overlays == sorted(f"{i:05d}_{Path(r['source']).stem}_{r['top_class']}.png" for i, r in enumerate(rows))


def test_unsupported_bundles_and_formats_fail_in_one_line(tmp_path: Path, trained: dict[str, Path]) -> None:
    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "bundle.json").write_text(json.dumps({"model_name": "fcos_resnet50_fpn", "classes": ["wbc"],
                                                      "task": "detect", "format_version": 2}))
    classical = tmp_path / "classical"
    classical.mkdir()
    (classical / "bundle.json").write_text(json.dumps({"model_name": "svm_rbf", "classes": ["a", "b"],
                                                       "framework": "sklearn", "format_version": 2,
                                                       "preprocessing": {"image_size": 48}}))
    for bundle, expected in ((detector, "is an FCOS detector: export supports Faster R-CNN detectors only"),
                             (classical, "is a classical (scikit-learn) model: export to ONNX supports torch")):
        result = invoke("export", "--bundle", bundle, "--format", "onnx")
        assert result.exit_code == 2 and expected in result.output
        assert len(result.output.strip().splitlines()) == 1
    result = invoke("export", "--bundle", trained["abas_cnn"], "--format", "tflite")
    assert result.exit_code == 2 and "--format must be onnx" in result.output
    result = invoke("export", "--bundle", trained["abas_cnn"], "--check", tmp_path / "missing")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_evaluate_on_an_exported_backend_scores_as_torch_does(exported: dict[str, Path], synthetic_root: Path,
                                                             tmp_path: Path) -> None:
    metrics = {}
    for backend in ("torch", "onnxruntime"):
        result = invoke("evaluate", "--bundle", exported["abas_cnn"], "--data", synthetic_root, "--out",
                        tmp_path / backend, "--backend", backend, "--threads", "1", "--allow-training-data")
        assert result.exit_code == 0, result.output
        metrics[backend] = json.loads((tmp_path / backend / "metrics.json").read_text())
    assert metrics["onnxruntime"]["accuracy"] == metrics["torch"]["accuracy"] and metrics["torch"]["n"] == 96
    assert any("Network run on onnxruntime" in note for note in metrics["onnxruntime"].get("notes", [])) or \
        "Network run on onnxruntime" in (tmp_path / "onnxruntime" / "report.html").read_text()
    bad = invoke("evaluate", "--bundle", exported["abas_cnn"], "--data", synthetic_root, "--backend", "tensorrt")
    assert bad.exit_code == 2 and "--backend must be one of auto, torch, onnxruntime, openvino" in bad.output
    # each image's OOD score is the graph's as it is torch's, and so is the flag
    rows = {backend: list(csv.DictReader((tmp_path / backend / "scored_images.csv").open()))
            for backend in ("torch", "onnxruntime")}
    assert all(row["ood_score"] for row in rows["torch"])
    assert [float(r["ood_score"]) for r in rows["onnxruntime"]] == pytest.approx(
        [float(r["ood_score"]) for r in rows["torch"]], rel=1e-3, abs=1e-3)
    assert metrics["onnxruntime"]["image_checks"]["unfamiliar"] == metrics["torch"]["image_checks"]["unfamiliar"]


def test_evaluate_says_why_a_graph_without_an_embedding_output_scored_no_image_for_familiarity(
        exported: dict[str, Path], synthetic_root: Path, tmp_path: Path, monkeypatch) -> None:
    """Not "no OOD statistics in the bundle": it has them, and its graph (one exported before embeddings were an
    output) cannot give their score; predict refuses such a graph, evaluate scores its classes and says why."""
    from leukoscope.inference.runtime import GraphRuntime

    assert read_bundle_info(exported["abas_cnn"]).ood["method"] == "mahalanobis"
    monkeypatch.setattr(GraphRuntime, "has_embeddings", property(lambda self: False))
    result = invoke("evaluate", "--bundle", exported["abas_cnn"], "--data", synthetic_root, "--out", tmp_path / "ev",
                    "--backend", "onnxruntime", "--threads", "1", "--allow-training-data")
    assert result.exit_code == 0, result.output
    checks = json.loads((tmp_path / "ev" / "metrics.json").read_text())["image_checks"]
    assert checks["unfamiliar"] is None and checks["ood_threshold"] is None
    assert "exported graph has no embedding output" in checks["ood_unscored_because"]
    assert "no OOD statistics" not in checks["note"] and "--backend torch" in checks["note"]
    rows = list(csv.DictReader((tmp_path / "ev" / "scored_images.csv").open()))
    assert len(rows) == 96 and not any(row["ood_score"] or row["unfamiliar"] for row in rows)


def test_an_export_says_in_the_model_card_what_it_runs(trained: dict[str, Path], synthetic_root: Path,
                                                        tmp_path: Path) -> None:
    import shutil

    bundle = shutil.copytree(trained["abas_cnn"], tmp_path / "bundle")
    (bundle / "MODEL_CARD.md").write_text("# A model\n\nTest accuracy 0.99 (PyTorch).\n")
    out = tmp_path / "float"
    result = invoke("export", "--bundle", bundle, "--out", out, "--check", synthetic_root, "--threads", "1")
    assert result.exit_code == 0, result.output
    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith("# A model\n\nTest accuracy 0.99 (PyTorch).\n\n## This export\n")
    assert "as onnx, float32." in card and "a float graph gives the same answers to rounding" in card
    assert f"    --check {synthetic_root.name}\n" in card and "    parity on 96 images: largest |p_torch" in card
    assert str(synthetic_root.parent) not in card  # the card travels: no local paths in it
    assert (bundle / "MODEL_CARD.md").read_text() == "# A model\n\nTest accuracy 0.99 (PyTorch).\n"  # source untouched
    int8 = invoke("export", "--bundle", out, "--out", out, "--int8", "--calibration", synthetic_root, "--threads", "1")
    assert int8.exit_code == 0, int8.output
    card = (out / "MODEL_CARD.md").read_text()
    assert card.count("## This export") == 1  # the float export's note is replaced, not kept beside it
    assert f"int8, calibrated on 96 images of `{synthetic_root.name}`" in card and "not this graph's" in card
    assert "Parity check" not in card  # no --check this time: the float graph's check no longer applies


def test_calibration_and_check_images_are_framed_as_predict_frames_them(trained: dict[str, Path],
                                                                        synthetic_root: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A classifier of a physical window: int8 ranges and the accuracy change were measured on whole images,
    which predict never gives it; now on the images framed as predict frames them (--as-given: as they are)."""
    import shutil

    import leukoscope.cell_window as cell_window

    bundle = shutil.copytree(trained["abas_cnn"], tmp_path / "windowed")
    record = json.loads((bundle / "bundle.json").read_text())
    record["preprocessing"]["cell_window_um"] = 24.0
    (bundle / "bundle.json").write_text(json.dumps(record))
    (bundle / "MODEL_CARD.md").write_text("# A windowed model\n")
    framed: list[tuple[int, int]] = []
    real = cell_window.frame_single_cell

    def counting(image, *args, **kwargs):
        framed.append(image.size)
        return real(image, *args, **kwargs)

    monkeypatch.setattr(cell_window, "frame_single_cell", counting)
    monkeypatch.setattr("leukoscope.inference.predictor.frame_single_cell", counting, raising=False)
    out = tmp_path / "int8"
    result = invoke("export", "--bundle", bundle, "--out", out, "--int8", "--calibration", synthetic_root,
                    "--check", synthetic_root, "--um-per-px", "0.1", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "bundle.json").read_text())["export"]["calibration_framed"] is True
    assert len(framed) >= 2 * 96  # calibration (ranges and OOD thresholds) and both backends of the check
    assert "(framed as predict frames them)" in (out / "MODEL_CARD.md").read_text()
    framed.clear()
    given = invoke("export", "--bundle", bundle, "--out", tmp_path / "given", "--int8", "--calibration",
                   synthetic_root, "--check", synthetic_root, "--as-given", "--threads", "1")
    assert given.exit_code == 0, given.output
    assert framed == [] and json.loads((tmp_path / "given" / "bundle.json").read_text())["export"][
        "calibration_framed"] is False
    both = invoke("export", "--bundle", bundle, "--as-given", "--um-per-px", "0.1")
    assert both.exit_code == 2 and "give one" in both.output


def test_check_or_calibration_data_that_cannot_be_read_leave_no_export(trained: dict[str, Path], tmp_path: Path,
                                                                      synthetic_root: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad --check manifest failed after the graph was written: the complete, unchecked export was left, and
    its folder blocked the rerun ("already exists and is not empty")."""
    semicolon = tmp_path / "semicolon.csv"
    semicolon.write_text("path;label\na.png;blast\n")
    cp1252 = tmp_path / "cp1252.csv"  # Excel's "CSV (Comma delimited)": refused, naming the encoding to save it in
    cp1252.write_bytes("path,label\n\u00e9.png,blast\n".encode("cp1252"))
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\n" + "".join(f"nowhere\\cell{i}.png,blast\n" for i in range(3)))
    out = tmp_path / "export"
    for option, data, said in (("--check", semicolon, "semicolon.csv"), ("--check", cp1252, "CSV UTF-8"),
                               ("--check", missing, "none of its 3 images exist"),
                               ("--calibration", missing, "none of its 3 images exist")):
        args = ["--int8"] if option == "--calibration" else []
        result = invoke("export", "--bundle", trained["abas_cnn"], "--out", out, *args, option, data)
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
        assert "exported" not in result.output and not out.exists(), option
    # a check that fails once the export is written (no image decodes): the export is removed, not left
    unreadable = tmp_path / "unreadable"
    (unreadable / "blast").mkdir(parents=True)
    (unreadable / "blast" / "a.png").write_bytes(b"not an image")
    result = invoke("export", "--bundle", trained["abas_cnn"], "--out", out, "--check", unreadable)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"(the export in {out} was removed: fix --check and export again)" in said, said
    assert not out.exists()
    # ...but a graph added to the bundle's own folder leaves that folder, the user's trained model, in place
    own = tmp_path / "own-bundle"
    shutil.copytree(trained["abas_cnn"], own)
    result = invoke("export", "--bundle", own, "--out", own, "--check", unreadable)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "stays, unchecked" in said, said
    assert (own / "model.safetensors").is_file() and (own / "bundle.json").is_file()
