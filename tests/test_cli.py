"""The command line, end to end, on small generated data."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from leukoscope.cli import app
from tests.conftest import fresh_python

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained_bundle(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-runs")
    result = invoke("train", "--data", synthetic_root, "--model", "mobilenet_v3_small", "--quiet",
                    f"output_root={out}", "model.image_size=32", "train.epochs=2", "train.lr=0.003",
                    "train.augmentation=geometric")
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    assert (bundle / "bundle.json").exists()
    return bundle


def test_training_says_when_the_ood_threshold_rests_on_few_images(trained_bundle: Path) -> None:
    """96 images: about 10 validation images set the OOD threshold (their 95th percentile); a lab's 6 had 25% of
    its new cells flagged, not 5%, with nothing said."""
    log = (trained_bundle.parent / "train.log").read_text()
    assert "the OOD threshold rests on" in log and "validation images (fewer than 30)" in log
    assert "5%%" not in log


def test_training_on_one_case_says_its_figures_are_its_training_images(synthetic_root: Path, tmp_path: Path) -> None:
    """A lab's export of one or two cases: every cell one subject, nothing left to validate or test on; the
    bundle's headline figure was its training accuracy, said only in the report."""
    images = sorted(synthetic_root.rglob("*.png"))[::4]
    manifest = tmp_path / "one-case.csv"
    manifest.write_text("path,label,subject\n" + "".join(f"{p},{p.parent.name},case-1\n" for p in images))
    result = invoke("train", "--data", manifest, "--model", "abas_cnn", "--quiet", f"output_root={tmp_path / 'runs'}",
                    "model.image_size=32", "train.epochs=1")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "no validation or test images" in said and "say nothing of new images" in said


def test_models_lists_the_registry() -> None:
    result = invoke("models")
    assert result.exit_code == 0
    for name in ("abas_cnn", "tusar_convnet", "mobilenet_v2", "resnet50", "vgg19", "densenet121",
                 "efficientnet_b0", "googlenet", "alexnet", "resnet18"):
        assert name in result.output
    # One column of kinds, also after the longest name (fasterrcnn_mobilenet_v3_fpn).
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len({line.index(line.split()[1]) for line in lines}) == 1


def test_predict_writes_csv_with_probabilities_and_uncertain(trained_bundle: Path, synthetic_root: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = invoke("predict", "--bundle", trained_bundle, synthetic_root / "blast", tmp_path / "broken.jpg",
                    "--out", out, "--threshold", "0.999999")
    assert result.exit_code == 3, result.output  # broken.jpg: a partial run
    # the bundle learned from some of these images, and says so (evaluate would refuse them)
    said = " ".join(result.output.split())
    assert "note: the classifier learned from" in said and "of its train images and" in said
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list((synthetic_root / "blast").iterdir())) + 1
    good = [r for r in rows if not r["error"]]
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("blast", "lymphocyte", "monocyte", "neutrophil")) - 1) < 1e-4
               for r in good)
    # with a threshold this high everything is "uncertain", but top_class is still given
    assert all(r["label"] == "uncertain" and r["top_class"] for r in good)
    # ... and with none, nothing is: the option, not the bundle's own threshold, decides
    low = tmp_path / "low.csv"
    assert invoke("predict", "--bundle", trained_bundle, synthetic_root / "blast", "--out", low,
                  "--threshold", "0").exit_code == 0
    assert not any(r["label"] == "uncertain" for r in csv.DictReader(low.open()))
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and "broken.jpg" in broken[0]["error"]
    # an unreadable image has no answer: its row said label "error", confidence 0.0, uncertain False
    assert all(broken[0][key] == "" for key in broken[0] if key not in ("source", "error")), broken[0]
    assert "1 failed" in result.output and "could not read 1 of" in result.output
    assert str(tmp_path / "broken.jpg") in result.output  # named on the terminal, not only in the CSV
    as_json = tmp_path / "preds.json"
    assert invoke("predict", "--bundle", trained_bundle, tmp_path / "broken.jpg", synthetic_root / "blast",
                  "--out", as_json).exit_code == 3  # broken.jpg
    unread = json.loads(as_json.read_text())[0]
    assert unread["error"] and [unread[key] for key in ("label", "top_class", "confidence", "uncertain")] == [None] * 4
    # every row has the same keys, an unreadable image's unknowns null (its row lacked the p_ keys)
    read = json.loads(as_json.read_text())[1]
    assert list(unread) == list(read) and all(unread[key] is None for key in read if key.startswith("p_"))


def test_predict_warns_of_images_too_small_to_show_a_cell(trained_bundle: Path, tmp_path: Path) -> None:
    """A 20 x 20 blur was called blast at 0.76 with nothing said."""
    Image.new("RGB", (20, 20), (150, 100, 180)).save(tmp_path / "tiny.png")
    Image.new("RGB", (64, 48), (150, 100, 180)).save(tmp_path / "cell.png")
    result = invoke("predict", "--bundle", trained_bundle, tmp_path / "tiny.png", tmp_path / "cell.png",
                    "--out", tmp_path / "p.csv")
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "1 image(s) smaller than 32 px a side cannot show a cell's detail" in said
    (warning,) = [line for line in result.output.splitlines() if "cannot show" in line]  # soft-wrapped: one line
    assert "tiny.png" in warning and "cell.png" not in warning
    rows = {Path(row["source"]).name: row for row in csv.DictReader((tmp_path / "p.csv").open())}
    assert set(rows) == {"tiny.png", "cell.png"}  # both answered, one doubted in its own row too
    assert rows["tiny.png"]["warnings"].startswith("Too small to show a cell: the image is 20 x 20 px")
    assert rows["cell.png"]["warnings"] == ""


def test_predict_warns_of_images_without_colour_as_analyze_does(trained_bundle: Path, tmp_path: Path) -> None:
    """analyze warned of a grey field; predict classified a grey cell image with nothing said."""
    rng = np.random.default_rng(0)
    grey = rng.integers(60, 220, (64, 64), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")  # grey saved as RGB too
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    result = invoke("predict", "--bundle", trained_bundle, tmp_path / "grey.png", tmp_path / "grey_rgb.png",
                    tmp_path / "colour.png", "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "2 image(s) have no colour (grey levels only)" in said
    (warning,) = [line for line in result.output.splitlines() if "no colour" in line]
    assert "grey.png" in warning and "grey_rgb.png" in warning and "colour.png" not in warning
    rows = {Path(row["source"]).name: row for row in csv.DictReader((tmp_path / "p.csv").open())}
    assert all(rows[name]["warnings"].startswith("the image has no colour (grey levels only)")
               for name in ("grey.png", "grey_rgb.png"))
    assert "no colour" not in rows["colour.png"]["warnings"] and rows["colour.png"]["label"]


def test_predict_exits_2_when_no_image_could_be_predicted(trained_bundle: Path, tmp_path: Path) -> None:
    for index in range(12):
        (tmp_path / "in" / f"bad{index:02d}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"bad{index:02d}.png").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    result = invoke("predict", "--bundle", trained_bundle, tmp_path / "in", "--out", out)
    assert result.exit_code == 2
    assert "could not read 12 of 12 images" in result.output and "no image could be predicted" in result.output
    assert "bad00.png" in result.output and "bad09.png" in result.output and "and 2 more" in result.output
    assert "bad10.png" not in result.output
    assert len(list(csv.DictReader(out.open()))) == 12  # the errors are still written
    # in the columns any predictions file has, every class's probability included
    header = out.read_text().splitlines()[0].split(",")
    assert header == ["source", "label", "top_class", "confidence", "uncertain", "p_blast", "p_lymphocyte",
                      "p_monocyte", "p_neutrophil", "ood_score", "unfamiliar", "um_per_px", "scale_source", "warnings",
                      "error"]


def test_predict_refuses_a_csv_manifest_and_writes_nothing(trained_bundle: Path, synthetic_root: Path,
                                                           tmp_path: Path) -> None:
    """A manifest was read as one image ("not a recognised image") and a one-row predictions file was written."""
    manifest = tmp_path / "cells.csv"
    manifest.write_text(f"path,label\n{sorted((synthetic_root / 'blast').glob('*.png'))[0]},blast\n")
    out = tmp_path / "preds.csv"
    result = invoke("predict", "--bundle", trained_bundle, manifest, "--out", out)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and not out.exists()
    assert "cells.csv: a CSV file, not an image: give images or folders of images" in said
    assert "leukoscope evaluate --data" in said


def test_predict_columns_do_not_depend_on_which_file_comes_first(trained_bundle: Path, synthetic_root: Path,
                                                                  tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    good = sorted((synthetic_root / "blast").iterdir())[0]
    headers = []
    for order in ([tmp_path / "broken.jpg", good], [good, tmp_path / "broken.jpg"]):
        out = tmp_path / f"p{len(headers)}.csv"
        assert invoke("predict", "--bundle", trained_bundle, *order, "--out", out).exit_code == 3  # one unread
        headers.append(out.read_text().splitlines()[0])
    assert headers[0] == headers[1] and headers[0].index("p_blast") < headers[0].index("ood_score")


def test_predict_json_and_explain(trained_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    images = sorted((synthetic_root / "monocyte").iterdir())[:3]
    out = tmp_path / "preds.json"
    result = invoke("predict", "--bundle", trained_bundle, *images, "--out", out, "--explain", tmp_path / "cam")
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [Path(r["source"]).name for r in rows] == [p.name for p in images]
    overlays = sorted((tmp_path / "cam").glob("*.png"))
    assert len(overlays) == 3
    # a 32 px mobilenet_v3_small reads a 2 x 2 map, and the command says what such a map can show
    assert "Grad-CAM reads this classifier's last stage at 2 x 2 for its 32 px input" in " ".join(result.output.split())
    width, height = Image.open(overlays[0]).size
    assert height >= 256 + 15 * 5 and width > 256 + 40  # the colour bar beside, the coarse-map caveat below
    # an unreadable file first: each overlay keeps its row's number in the predictions file
    (tmp_path / "broken.png").write_bytes(b"not an image")
    # an existing --out, or a folder of an earlier run's heatmaps, is replaced only with --overwrite: two runs' maps
    # had mixed in one folder (rows numbered alike, one image under two labels) and the predictions file was replaced
    (tmp_path / "cam" / "notes.txt").write_text("mine")
    before = out.read_text()
    for target in (["--explain", tmp_path / "cam2"], ["--explain", tmp_path / "cam"]):
        refused = invoke("predict", "--bundle", trained_bundle, tmp_path / "broken.png", *images,
                         "--out", out if target[1].name == "cam2" else tmp_path / "new.json", *target)
        assert refused.exit_code == 2 and "--overwrite" in refused.output, refused.output
    assert out.read_text() == before and not (tmp_path / "cam2").exists() and not (tmp_path / "new.json").exists()
    # --overwrite on a run refused for another reason keeps the earlier maps (they were removed first)
    maps = sorted(p.name for p in (tmp_path / "cam").glob("*.png"))
    refused = invoke("predict", "--bundle", trained_bundle, *images, "--out", out, "--explain", tmp_path / "cam",
                     "--overwrite", "--threshold", "5")
    assert refused.exit_code == 2 and sorted(p.name for p in (tmp_path / "cam").glob("*.png")) == maps
    again = invoke("predict", "--bundle", trained_bundle, tmp_path / "broken.png", *images, "--out", out,
                   "--explain", tmp_path / "cam", "--overwrite")
    assert again.exit_code == 3, again.output  # broken.png unread
    rows = json.loads(out.read_text())
    for overlay in sorted((tmp_path / "cam").glob("*.png")):
        row = rows[int(overlay.name[:5])]
        assert overlay.name.startswith(f"{overlay.name[:5]}_{Path(row['source']).stem}_") and not row["error"]
    # the earlier run's maps are gone (00000 was its first image's), the folder's other files kept
    assert sorted(p.name[:5] for p in (tmp_path / "cam").glob("*.png")) == ["00001", "00002", "00003"]
    assert (tmp_path / "cam" / "notes.txt").read_text() == "mine"


def test_predict_and_evaluate_take_quiet(trained_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """--quiet silenced the progress of train, analyze and segment, and was refused by predict and evaluate."""
    images = sorted((synthetic_root / "monocyte").iterdir())[:2]
    for quiet in ([], ["--quiet"]):
        said = invoke("predict", "--bundle", trained_bundle, *images, "--out", tmp_path / f"p{len(quiet)}.csv",
                      "--explain", tmp_path / f"cam{len(quiet)}", *quiet).output
        assert ("predicting" in said and "Grad-CAM:" in said) is not bool(quiet), said
    split = trained_bundle.parent / "split.json"
    for quiet in ([], ["--quiet"]):
        result = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--split-file", split,
                        "--out", tmp_path / f"ev{len(quiet)}", *quiet)
        assert result.exit_code == 0 and ("scoring" in result.output) is not bool(quiet), result.output


def test_evaluate_says_when_copies_of_one_image_carry_two_labels(trained_bundle: Path, synthetic_root: Path,
                                                                  tmp_path: Path, caplog) -> None:
    """split and train warned of byte-identical images under two labels; evaluate scored both copies in silence,
    one against a wrong label."""
    import shutil

    for kind in ("blast", "monocyte"):
        (tmp_path / "data" / kind).mkdir(parents=True)
        for image in sorted((synthetic_root / kind).iterdir())[:3]:
            shutil.copy(image, tmp_path / "data" / kind / image.name)
    copied = sorted((synthetic_root / "blast").iterdir())[0]
    shutil.copy(copied, tmp_path / "data" / "monocyte" / "copy.png")
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", tmp_path / "data", "--out", tmp_path / "ev",
                    "--allow-training-data", "--quiet")
    said = " ".join(caplog.text.split())  # leukoscope's warnings: the terminal's WARNING lines
    assert result.exit_code == 0 and "1 set(s) of byte-identical images carry different labels" in said, said
    assert "copy.png (monocyte)" in said


def test_predict_explain_notes_flat_maps(trained_bundle: Path, synthetic_root: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    import leukoscope.inference.explain as explain

    # a collapsed model: each raw map varies by 0.7% of its level, its ripple stretched to [0, 1] for display
    # (judged on that scaled map, no map was ever flat)
    ramp = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (32, 1))
    monkeypatch.setattr(explain, "grad_cam_maps", lambda model, inputs, index, views=1: explain.GradCamMaps(
        np.stack([ramp] * len(inputs)), np.full(len(inputs), 0.007)))
    images = sorted((synthetic_root / "blast").iterdir())[:2]
    result = invoke("predict", "--bundle", trained_bundle, *images, "--out", tmp_path / "p.csv",
                    "--explain", tmp_path / "cam")
    assert result.exit_code == 0, result.output
    assert "2 of 2 Grad-CAM maps are flat" in result.output
    assert len(list((tmp_path / "cam").glob("*.png"))) == 2


def test_evaluate_scores_a_labelled_folder(trained_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    # The folder holds the bundle's own training images: refused, then scored with a warning when asked.
    refused = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--out", tmp_path / "ev")
    assert refused.exit_code == 2 and "of its train images" in refused.output and "--split-file" in refused.output
    assert not (tmp_path / "ev").exists()
    # the split given, a training part of it asked for: the remedy is --subset test (it said "--split-file", given)
    split = trained_bundle.parent / "split.json"
    val = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--split-file", split,
                 "--subset", "val", "--out", tmp_path / "ev")
    said = " ".join(val.output.split())
    assert val.exit_code == 2 and "scored with --subset test" in said and "--split-file" not in said, said
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--out", tmp_path / "ev",
                    "--allow-training-data")
    assert result.exit_code == 0, result.output
    assert "says nothing about new images" in (tmp_path / "ev" / "report.html").read_text()
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 96 and 0 <= metrics["accuracy"] <= 1
    assert (tmp_path / "ev" / "report.html").exists()
    # each scored image's label and call beside the metrics (to find the errors, predict had to be run again)
    rows = list(csv.DictReader((tmp_path / "ev" / "scored_images.csv").open()))
    assert len(rows) == 96 and {row["true_label"] for row in rows} == set(metrics["classes"])
    matrix = [[sum(r["true_label"] == t and r["predicted"] == p for r in rows) for p in metrics["classes"]]
              for t in metrics["classes"]]
    assert matrix == metrics["confusion_matrix"]
    assert sum(r["correct"] == "True" for r in rows) == round(metrics["accuracy"] * 96)
    # copied elsewhere and renamed, they are still its training images: the bundle records their contents
    moved = tmp_path / "moved" / "blast"
    moved.mkdir(parents=True)
    for number, image in enumerate(sorted((synthetic_root / "blast").iterdir())):
        shutil.copy(image, moved / f"copy{number}.png")
    copied = invoke("evaluate", "--bundle", trained_bundle, "--data", tmp_path / "moved", "--out", tmp_path / "ev2")
    assert copied.exit_code == 2 and "of its train images" in " ".join(copied.output.split()), copied.output


def test_evaluate_rejects_classes_the_model_does_not_know(trained_bundle: Path, synthetic_root: Path,
                                                           tmp_path: Path) -> None:
    data = tmp_path / "other"
    (data / "eosinophil").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 100, 100)).save(data / "eosinophil" / "a.png")
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", data)
    assert result.exit_code == 2
    assert "eosinophil" in result.output and "does not know" in result.output


def test_clear_errors_for_bad_input(tmp_path: Path, trained_bundle: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--data", tmp_path / "empty", f"output_root={tmp_path}")
    assert result.exit_code == 2 and "empty" in result.output
    result = invoke("train", "--data", tmp_path, "train.epoch=3")
    assert result.exit_code == 2 and "train.epochs" in result.output
    assert "command-line override 'train.epoch=3'" in result.output and "defaults" not in result.output
    result = invoke("train", "--data", tmp_path / "missing")
    assert result.exit_code == 2 and "missing: folder does not exist" in result.output
    result = invoke("evaluate", "--bundle", tmp_path / "empty", "--data", tmp_path)
    assert result.exit_code == 2 and "not a leukoscope bundle (no bundle.json)" in result.output
    result = invoke("predict", "--bundle", tmp_path / "nope", tmp_path)
    assert result.exit_code == 2 and "bundle" in result.output
    result = invoke("predict", "--bundle", trained_bundle, tmp_path / "missing.png")
    assert result.exit_code == 2 and "missing.png" in result.output
    result = invoke("predict", "--bundle", trained_bundle, tmp_path / "empty")
    assert result.exit_code == 2 and "no images" in result.output


def test_bad_options_and_outputs_are_one_line_errors(tmp_path: Path, trained_bundle: Path, caplog) -> None:
    """Checked before any model loads or image is read: a file where an output folder must go, thresholds
    outside [0, 1], a batch of 0, an opset torch cannot write, a config value out of range; and a key of an
    unknown section or a check across keys named under the command-line override that set it."""

    (tmp_path / "afile").write_text("x")
    cell = tmp_path / "cell.png"
    Image.new("RGB", (32, 32), (200, 100, 150)).save(cell)
    for args, message in (
            (["analyze", cell, "--out", tmp_path / "afile"], "afile is a file, not a folder"),
            (["predict", cell, "--bundle", trained_bundle, "--out", tmp_path / "afile" / "p.csv"], "is a file"),
            (["analyze", cell, "--detector-threshold", "2"], "detector threshold must be in [0, 1], got 2.0"),
            (["predict", cell, "--bundle", trained_bundle, "--batch-size", "0"], "--batch-size must be at least 1"),
            (["predict", cell, "--bundle", trained_bundle, "--out", tmp_path / "p.txt"], "must end in .csv or .json"),
            (["predict", cell, "--bundle", trained_bundle, "--threshold", "1.5"], "--threshold must be in [0, 1]"),
            (["export", "--bundle", trained_bundle, "--out", tmp_path / "x", "--opset", "3"],
             "opset must be between 13 and 20, got 3"),
            (["train", "--data", tmp_path, "train.label_smoothing=5"], "less than or equal to 1"),
            (["train", "--data", tmp_path, "train.lr=0"], "'train.lr=0': config key 'train.lr': Input should be "
                                                          "greater than 0"),
            (["train", "--data", tmp_path, "train.momentum=1"], "config key 'train.momentum': Input should be less"),
            (["train", "--data", tmp_path, "search.lr=[0.1,-1]"], "config key 'search.lr.1': Input should be greater"),
            (["train-detector", "--data", tmp_path, "train.weight_decay=-1"],
             "config key 'train.weight_decay': Input should be greater than or equal to 0"),
            (["train", "--data", tmp_path, "trian.epochs=3"], "command-line override 'trian.epochs=3': unknown"),
            (["train", "--data", tmp_path, "data.ratios=[0.9,0.05,0.1]"],
             "command-line override 'data.ratios=[0.9,0.05,0.1]': data.ratios must be")):
        result = invoke(*args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
    # a class folder without images is left out, and said
    for name, count in (("a", 3), ("b", 3), ("c", 0)):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (16, 16), (10 * i, 50, 90)).save(tmp_path / "classes" / name / f"{i}.png")
    from leukoscope.data.readers import read_class_folders

    with caplog.at_level(logging.WARNING, logger="leukoscope.data.readers"):
        manifest = read_class_folders(tmp_path / "classes")
    assert manifest.classes == ["a", "b"] and "without images left out" in caplog.text and ": c" in caplog.text


def test_analyze_exits_2_when_no_field_could_be_read(tmp_path: Path) -> None:
    (tmp_path / "zero.jpg").write_bytes(b"")
    result = invoke("analyze", tmp_path / "zero.jpg", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "1 image(s) could not be read" in result.output
    # a file never analysed is not a field where no white cell was found, nor one with too few cells
    assert "No white cell" not in result.output and "Not analysed: none of the 1 file(s)" in result.output
    assert "none of the 1 image(s) could be read" in result.output and "too few cells" not in result.output
    field = json.loads((tmp_path / "out" / "zero.json").read_text())
    assert field["error"] and field["differential"]["flags"] == [f"Not analysed: the file could not be read "
                                                                  f"({field['error']})"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [row["flags"].startswith("Not analysed") for row in rows] == [True, True]  # the field and TOTAL


def test_split_refuses_classes_that_differ_only_in_case(synthetic_root: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    images = sorted((synthetic_root / "blast").glob("*.png"))
    rows = "".join(f"{p},{'Blast' if i % 2 else 'blast'}\n" for i, p in enumerate(images))
    manifest.write_text("path,label\n" + rows)
    result = invoke("split", "--data", manifest, "--out", tmp_path / "s.json")
    assert result.exit_code == 2 and "'Blast' and 'blast' differ only in case" in " ".join(result.output.split())
    assert not (tmp_path / "s.json").exists()


def test_split_of_a_folder_with_its_manifest_beside_one_image_folder_points_to_it(synthetic_root: Path,
                                                                                  tmp_path: Path) -> None:
    """labels.csv beside images/ (a common way to share a labelled set) said only "found only ['images']"."""
    (tmp_path / "shared" / "images").mkdir(parents=True)
    rows = []
    for label in ("blast", "monocyte"):
        for image in sorted((synthetic_root / label).glob("*.png"))[:3]:
            shutil.copy(image, tmp_path / "shared" / "images" / f"{label}-{image.name}")
            rows.append(f"images/{label}-{image.name},{label}\n")
    (tmp_path / "shared" / "labels.csv").write_text("path,label\n" + "".join(rows))
    (tmp_path / "shared" / "notes.csv").write_text("what,when\nscanned,today\n")  # no path column: not named
    result = invoke("split", "--data", tmp_path / "shared", "--out", tmp_path / "s.json")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "found only ['images']" in said
    assert "labels.csv lists images: give it as --data" in said and "notes.csv" not in said


def test_split_command_saves_a_checked_split(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "split.json"
    result = invoke("split", "--data", synthetic_root, "--out", out, "--ratios", "0.75,0.25")
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert set(payload["splits"]) == {"train", "test"}
    assert len(payload["splits"]["test"]) == 24
    # a split is made once and shared: it was replaced silently by another seed's; a folder or a bad ratio
    # were tracebacks (and a folder's run left "<folder>.tmp" behind)
    again = invoke("split", "--data", synthetic_root, "--out", out, "--seed", "3")
    assert again.exit_code == 2 and "already exists" in again.output and json.loads(out.read_text()) == payload
    assert invoke("split", "--data", synthetic_root, "--out", out, "--seed", "3", "--overwrite").exit_code == 0
    folder = invoke("split", "--data", synthetic_root, "--out", tmp_path)
    assert folder.exit_code == 2 and "is a folder" in folder.output and not list(tmp_path.glob("*.tmp"))
    bad = invoke("split", "--data", synthetic_root, "--out", tmp_path / "new.json", "--ratios", "0.8,abc")
    assert bad.exit_code == 2 and "--ratios must be numbers" in bad.output


def test_split_refuses_what_training_refuses(synthetic_root: Path, tmp_path: Path) -> None:
    """`split --ratios 0,0.5,0.5` and a class named uncertain were written without a word, and `train` refused
    the split; both now refuse with one message."""
    common = ["--model", "naive_bayes", "--quiet", f"output_root={tmp_path / 'runs'}", "model.image_size=32"]
    empty = invoke("split", "--data", synthetic_root, "--out", tmp_path / "s0.json", "--ratios", "0,0.5,0.5")
    trained = invoke("train", "--data", synthetic_root, "data.ratios=[0,0.5,0.5]", *common)
    for result in (empty, trained):
        assert result.exit_code == 2
        assert "the training split is empty: its ratios [0.0, 0.5, 0.5] give it none" in " ".join(result.output.split())
    assert not (tmp_path / "s0.json").exists()
    data = tmp_path / "unc"
    for name in ("blast", "lymphocyte"):
        shutil.copytree(synthetic_root / name, data / name)
    shutil.copytree(synthetic_root / "monocyte", data / "uncertain")
    unsorted = invoke("split", "--data", data, "--out", tmp_path / "s-unc.json")
    trained = invoke("train", "--data", data, *common)
    for result in (unsorted, trained):
        assert result.exit_code == 2
        assert "a class 'uncertain' holds cells a classifier could not call" in " ".join(result.output.split())
    assert not (tmp_path / "s-unc.json").exists()


def test_split_says_which_parts_its_ratios_left_out(synthetic_root: Path, tmp_path: Path) -> None:
    """`split --ratios 1,0,0` said nothing, and `train` on it blamed "too few images" for the missing parts."""
    whole = invoke("split", "--data", synthetic_root, "--out", tmp_path / "s1.json", "--ratios", "1,0,0")
    assert whole.exit_code == 0, whole.output
    said = " ".join(whole.output.split())
    assert "note: no validation or test part: --ratios 1,0,0 gives them none" in said
    assert "say nothing of new images" in said
    no_val = " ".join(invoke("split", "--data", synthetic_root, "--out", tmp_path / "s2.json", "--ratios",
                             "0.75,0.25").output.split())
    assert "note: no validation part: --ratios 0.75,0.25 gives it none" in no_val
    full = invoke("split", "--data", synthetic_root, "--out", tmp_path / "s3.json").output
    assert "note: no" not in full
    trained = invoke("train", "--data", synthetic_root, "--split-file", tmp_path / "s1.json", "--model",
                     "naive_bayes", "--quiet", f"output_root={tmp_path / 'runs'}", "model.image_size=32")
    assert trained.exit_code == 0, trained.output
    said = " ".join(trained.output.split())
    assert "no validation or test images (the split's ratios give them none)" in said and "too few" not in said


def test_split_help_says_which_copies_it_keeps_together_and_which_it_misses() -> None:
    """A copy with 3% of its border cut off went to train, its original to test, under a split called
    duplicate-aware: the help now says what the perceptual hash catches, and what it does not."""
    said = " ".join(invoke("split", "--help").output.replace("│", " ").split())
    assert "byte copies, re-encoded copies, resized copies, rotations and mirror images, and brightness" in said
    assert "Not caught: cropped or re-framed copies" in said and "cell photographed again" in said


def test_no_command_help_shows_a_value_after_a_switch() -> None:
    """typer's help had shown ``--quiet <bool>`` (and so every switch): a user typing ``--quiet true`` got
    "unexpected extra argument". Switches take no value, and the help shows none; options with values keep theirs.
    (typer's own ``--help`` row still shows it: left, every user knows that one.)"""
    from typer.main import get_command

    group = get_command(app)
    commands = [(name, command) for name, command in group.commands.items()]
    commands += [(f"{name} {sub}", c) for name, command in group.commands.items()
                 for sub, c in getattr(command, "commands", {}).items()]
    switches = [(name, p.opts[0]) for name, command in commands for p in command.params if getattr(p, "is_flag", False)]
    assert len(switches) >= 25
    for name, command in commands:
        rows = [line for line in invoke(*name.split(), "--help").output.splitlines() if "--help" not in line]
        assert not [line for line in rows if "<bool>" in line], name  # --help's own row is typer's
    assert "<path>" in invoke("predict", "--help").output


def test_corrupt_image_policy(synthetic_root: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    (data / "blast" / "zz_truncated.png").write_bytes((data / "blast" / "blast_0000.png").read_bytes()[:200])
    common = ["train", "--data", data, "--model", "mobilenet_v3_small", "--quiet", f"output_root={tmp_path}/runs",
              "model.image_size=32", "train.epochs=1", "data.near_duplicates=false"]
    failed = invoke(*common, "data.on_corrupt=fail")
    assert failed.exit_code == 2 and "zz_truncated.png" in failed.output
    skipped = invoke(*common, "data.on_corrupt=skip")
    assert skipped.exit_code == 0, skipped.output
    run_dir = Path(skipped.stdout.strip().splitlines()[-1]).parent
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [Path(s["path"]).name for s in metrics["skipped_images"]] == ["zz_truncated.png"]
    assert "zz_truncated.png" in (run_dir / "report.html").read_text()


def test_demo_generates_data_trains_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo #2"  # taken as written (an override's YAML would cut it at the "#")
    result = invoke("demo", "--out", out, "--minutes", "0.02", "--quiet")
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    assert (bundle / "bundle.json").is_file() and (bundle.parent / "report.html").is_file()
    assert bundle.is_relative_to(out / "runs")
    classes = sorted(p.name for p in (out / "data").iterdir())
    assert classes == ["blast", "lymphocyte", "monocyte", "neutrophil"]
    assert all(len(list((out / "data" / c).iterdir())) == 100 for c in classes)
    assert "demo finished" in result.output


def test_train_resume_continues_the_run(synthetic_root: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(synthetic_root.parent)  # a relative data path, as a user types it
    first = invoke("train", "--data", synthetic_root.name, "--model", "mobilenet_v3_small", "--quiet",
                   f"output_root={tmp_path}", "model.image_size=32", "train.epochs=1", "train.keep_checkpoint=true")
    assert first.exit_code == 0, first.output
    run_dir = Path(first.stdout.strip().splitlines()[-1]).parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run stored absolute data paths: resuming works from any folder
    # the shared split file it was copied from is remade meanwhile (another seed, as after new images): the
    # resume goes on with the run's own split, which the checkpoint trained on, and keeps it
    own = (run_dir / "split.json").read_text()
    (shared,) = (tmp_path / "splits").glob("*.json")
    split = invoke("split", "--data", synthetic_root, "--out", shared, "--seed", "7", "--overwrite")
    assert split.exit_code == 0, split.output
    assert shared.read_text() != own
    resumed = invoke("train", "--resume", run_dir.resolve(), "--quiet", "train.epochs=2")
    assert resumed.exit_code == 0, resumed.output
    assert Path(resumed.stdout.strip().splitlines()[-1]).parent == run_dir
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert "resuming at epoch 2" in (run_dir / "train.log").read_text()
    assert (run_dir / "split.json").read_text() == own


def test_a_resume_goes_on_with_its_own_split_or_is_refused(synthetic_root: Path, tmp_path: Path) -> None:
    """After new images its split no longer fitted, and the advice ("delete it and the next run makes a new
    one") made the resume re-split: images its checkpoint trained on became test images, and a new class wrote a
    4-class split.json beside a 3-class checkpoint."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    first = invoke("train", "--data", data, "--model", "mobilenet_v3_small", "--quiet", f"output_root={tmp_path}",
                   "model.image_size=32", "train.epochs=1", "train.keep_checkpoint=true")
    assert first.exit_code == 0, first.output
    run_dir = Path(first.stdout.strip().splitlines()[-1]).parent
    own = run_dir / "split.json"
    added = data / "blast" / "added.png"
    shutil.copy(next((data / "lymphocyte").iterdir()), added)
    changed = invoke("train", "--resume", run_dir, "--quiet", "train.epochs=2")
    said = " ".join(changed.output.split())
    assert changed.exit_code == 2 and "restore the data it was made from, or start a new run" in said, said
    assert "delete it" not in said
    added.unlink()  # the data as they were: the shared split in splits/ fits them
    split = own.read_bytes()
    own.unlink()
    gone = invoke("train", "--resume", run_dir, "--quiet", "train.epochs=2")
    said = " ".join(gone.output.split())
    assert gone.exit_code == 2, said  # it went on with the shared split and wrote it as the run's
    assert f"a resumed run continues on the split it trained on; restore {own} or start a new run" in said
    assert not own.exists()
    own.write_bytes(split)
    resumed = invoke("train", "--resume", run_dir, "--quiet", "train.epochs=2")
    assert resumed.exit_code == 0, resumed.output
    assert own.read_bytes() == split


def test_a_resume_that_would_change_what_the_run_learns_is_refused_and_leaves_it_resumable(
        synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = invoke("train", "--data", synthetic_root, "--model", "mobilenet_v3_small", "--quiet",
                   f"output_root={tmp_path}", "model.image_size=32", "train.epochs=2", "train.keep_checkpoint=true")
    assert first.exit_code == 0, first.output
    run_dir = Path(first.stdout.strip().splitlines()[-1]).parent
    config = (run_dir / "config.yaml").read_bytes()
    for args, said in [(["model.name=resnet18"], "model.name=resnet18: a run being resumed keeps its model"),
                       (["train.lr=0.1"], "only train.epochs"),
                       (["--data", str(synthetic_root)], "--data cannot change a run being resumed"),
                       (["--model", "resnet18"], "--model cannot change a run being resumed"),
                       (["train.epochs=1"], "train.epochs=1 is below the 2 epochs this run has already trained"),
                       # finished (its checkpoint kept): it retrained nothing and wrote its report again
                       ([], "is finished (completed all epochs) and its bundle is written, so it would train "
                             "nothing; raise train.epochs (now 2)")]:
        refused = invoke("train", "--resume", run_dir, "--quiet", *args)
        assert refused.exit_code != 0 and said in " ".join(refused.output.split()), (args, refused.output)
        assert "Traceback" not in refused.output
        assert (run_dir / "config.yaml").read_bytes() == config, args  # nothing rewritten: still resumable
    with monkeypatch.context() as patch:  # too few epochs is refused before the data are looked at
        patch.setattr("leukoscope.data.readers.check_dataset_path", _fail_if_called)
        refused = invoke("train", "--resume", run_dir, "--quiet", "train.epochs=1")
        assert refused.exit_code == 2 and "below the 2 epochs" in refused.output, refused.output
    resumed = invoke("train", "--resume", run_dir, "--quiet", "train.epochs=3")
    assert resumed.exit_code == 0, resumed.output
    assert [h["epoch"] for h in json.loads((run_dir / "history.json").read_text())] == [1, 2, 3]
    # a run without its checkpoint is refused before the data are prepared; a damaged one in one line
    checkpoint = run_dir / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:100])
    damaged = invoke("train", "--resume", run_dir, "--quiet", "train.epochs=4")
    assert damaged.exit_code == 2 and "cannot be read" in damaged.output and "Traceback" not in damaged.output
    checkpoint.unlink()
    with monkeypatch.context() as patch:
        patch.setattr("leukoscope.data.readers.check_dataset_path", _fail_if_called)
        gone = invoke("train", "--resume", run_dir, "--quiet", "train.epochs=4")
    assert gone.exit_code == 2 and "the run completed and removed it" in " ".join(gone.output.split()), gone.output


def _fail_if_called(*args, **kwargs) -> None:
    raise AssertionError("should not have been called")


def test_evaluate_names_a_missing_split_part(trained_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    assert invoke("split", "--data", synthetic_root, "--out", split).exit_code == 0
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--split-file", split,
                    "--subset", "holdout")
    assert result.exit_code == 2 and "no part named 'holdout'" in result.output


def test_evaluate_and_predict_refuse_outputs_they_could_not_write_before_any_work(
        trained_bundle: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing file as evaluate's --out, a folder as predict's, a --subset without its split: each said in
    one line before any image is scored (tracebacks after the scoring before; --subset was silently ignored)."""
    monkeypatch.setattr("leukoscope.tasks.classify.evaluate_bundle", _fail_if_called)
    monkeypatch.setattr("leukoscope.inference.predict_files.predict_to_file", _fail_if_called)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, expected in ((afile, "is a file, not a folder"), (afile / "sub", "is a file, not a folder")):
        result = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--out", out)
        assert result.exit_code == 2 and expected in result.output, result.output
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--subset", "val")
    assert result.exit_code == 2 and "--subset val names a part of a split: give the split with --split-file" \
        in result.output
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--split-file", tmp_path)
    assert result.exit_code == 2 and "is a folder, not a split file" in result.output
    result = invoke("evaluate", "--bundle", afile, "--data", synthetic_root)
    assert result.exit_code == 2 and "is a file; a bundle is a folder" in result.output
    folder = tmp_path / "preds.csv"
    folder.mkdir()
    result = invoke("predict", "--bundle", trained_bundle, synthetic_root / "blast", "--out", folder)
    assert result.exit_code == 2 and "is a folder; give the file to write" in result.output


def test_evaluate_refuses_a_row_without_a_label_before_decoding(
        trained_bundle: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("leukoscope.tasks.classify.decode_manifest", _fail_if_called)
    first, second = sorted((synthetic_root / "blast").iterdir())[:2]
    manifest = tmp_path / "unlabelled.csv"
    manifest.write_text(f"path,label\n{first},blast\n{second},\n")
    result = invoke("evaluate", "--bundle", trained_bundle, "--data", manifest, "--allow-training-data",
                    "--out", tmp_path / "eval")
    assert result.exit_code == 2 and "1 sample(s) have no label" in result.output, result.output


def test_evaluate_shows_the_scoring_as_it_goes(trained_bundle: Path, synthetic_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring is its own progress bar, advanced a chunk at a time, and the chunks give the same scores."""
    from contextlib import contextmanager

    import leukoscope.tasks.classify as classify

    steps: dict[str, list[int]] = {}

    @contextmanager
    def recording(total, description, **kwargs):
        steps[description] = []
        yield lambda advance=1, info="", **counts: steps[description].append(advance)

    monkeypatch.setattr(classify, "progress_bar", recording)
    monkeypatch.setattr(classify, "SCORE_CHUNK", 64)  # the network's own batch: the same batches as unchunked
    chunked = classify.evaluate_bundle(trained_bundle, synthetic_root, tmp_path / "a", allow_training_data=True)
    n = chunked["n"]
    assert steps["scoring"] == [64] * (n // 64) + ([n % 64] if n % 64 else []) and n > 64
    monkeypatch.setattr(classify, "SCORE_CHUNK", 10_000)
    whole = classify.evaluate_bundle(trained_bundle, synthetic_root, tmp_path / "b", allow_training_data=True)
    assert chunked["accuracy"] == whole["accuracy"]
    assert {name: c["roc_auc"] for name, c in chunked["per_class"].items()} == pytest.approx(
        {name: c["roc_auc"] for name, c in whole["per_class"].items()}, abs=1e-9)  # the same scores, not just calls


def test_evaluate_names_the_bundle_s_temperature_and_data_on_the_reliability_diagram(
        trained_bundle: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate divides the logits by the bundle's temperature, yet its reliability curve was labelled "model"."""
    from leukoscope.bundle import read_bundle_info
    from leukoscope.evaluation import figures

    legends: list[list[str]] = []
    real = figures.save_figure

    def keep(fig, path):
        if Path(path).name == "reliability.png":
            legend = fig.axes[0].get_legend()
            legends.append([legend.get_title().get_text(), *(t.get_text() for t in legend.get_texts())])
        return real(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    import leukoscope.tasks.classify as classify

    result = classify.evaluate_bundle(trained_bundle, synthetic_root, tmp_path / "e", allow_training_data=True)
    temperature = read_bundle_info(trained_bundle).temperature
    expected = f"after temperature T = {temperature:.2f}" if temperature != 1.0 else "model (no temperature scaling)"
    assert legends[-1][0] == f"{synthetic_root.name}, n = {result['n']}"
    assert legends[-1][2].startswith(f"{expected} (ECE = ")


def test_train_takes_option_paths_as_written_and_checks_where_it_writes(
        synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--data "tiny #2" was read as YAML ("tiny", a comment after it): another folder, or none. Where the run
    and its split go must be folders, said before any data are prepared."""
    monkeypatch.setattr("leukoscope.tasks.classify.run_experiment", _fail_if_called)
    hashed = tmp_path / "tiny #2"
    shutil.copytree(synthetic_root, hashed)
    (tmp_path / "tiny").mkdir()  # what the YAML reading would have trained on
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = invoke("train", "--data", hashed, "--model", "abas_cnn", "--quiet", f"output_root={afile}")
    assert result.exit_code == 2 and f"output_root {afile}: {afile} is a file, not a folder" in result.output
    result = invoke("train", "--data", hashed, "--model", "abas_cnn", "--quiet", f"output_root={tmp_path / 'runs'}",
                    "--split-file", tmp_path)
    assert result.exit_code == 2 and "is a folder, not a split file" in result.output
    result = invoke("train", "--data", hashed, "--model", "abas_cnn", "--quiet", f"output_root={tmp_path / 'runs'}",
                    "--split-file", afile / "split.json")
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    from leukoscope.cli.training import _overrides
    from leukoscope.engine.config import load_config

    assert load_config(overrides=_overrides([], str(hashed), None)).data.path == str(hashed)
    assert load_config(overrides=_overrides([], "2024", None)).data.path == "2024"  # a folder named 2024


def test_search_without_a_search_section_is_refused_before_training(synthetic_root: Path, tmp_path: Path) -> None:
    result = invoke("search", "--data", synthetic_root, f"output_root={tmp_path / 'runs'}")
    assert result.exit_code == 2
    assert "nothing to search" in result.output and "search:\n  epochs: [5, 10]\n  lr: [0.01, 0.001]" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("command", "target", "extra"), [
    ("train", "leukoscope.tasks.classify.run_experiment", []),
    ("search", "leukoscope.tasks.search.run_search", ["search.lr=[0.1,0.01]"]),
    ("compare", "leukoscope.tasks.compare.run_compare", []),
])
def test_split_file_option_reaches_the_config(command: str, target: str, extra: list[str], synthetic_root: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stop(Exception):
        pass

    seen = {}

    def capture(cfg, **kwargs):
        seen["split_file"] = cfg.data.split_file
        raise Stop

    monkeypatch.setattr(target, capture)
    result = invoke(command, "--data", synthetic_root, "--split-file", tmp_path / "split.json", *extra)
    assert isinstance(result.exception, Stop), result.output
    assert seen["split_file"] == str(tmp_path / "split.json")


def test_train_uses_the_split_made_by_split(synthetic_root: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    assert invoke("split", "--data", synthetic_root, "--out", split, "--ratios", "0.5,0.25,0.25").exit_code == 0
    result = invoke("train", "--data", synthetic_root, "--split-file", split, "--model", "mobilenet_v3_small",
                    "--quiet", f"output_root={tmp_path / 'runs'}", "model.image_size=32", "train.epochs=1")
    assert result.exit_code == 0, result.output
    run_dir = Path(result.stdout.strip().splitlines()[-1]).parent
    assert (run_dir / "split.json").read_bytes() == split.read_bytes()
    assert f"reusing split {split}" in result.output and "train 48 / val 24 / test 24" in result.output
    # the report's path is printed once, whole, on one line (not wrapped at 80 columns)
    assert result.output.count("report:") == 1
    assert f"report: {run_dir / 'report.html'}" in result.output


@pytest.mark.parametrize(("option", "override"), [(["--model", "resnet18"], "model.name=mobilenet_v3_small"),
                                                  (["--data", "a"], "data.path=b"),
                                                  (["--init", "pretrained:wbc-classifier"], "model.init=x")])
def test_an_option_and_an_override_of_one_key_are_refused(option: list[str], override: str, tmp_path: Path) -> None:
    """--model resnet18 model.name=mobilenet_v2 trained resnet18: the option won unseen."""
    result = invoke("train", *option, override, f"output_root={tmp_path}")
    assert result.exit_code == 2 and f"{option[0]} and the override {override} both set" in result.output
    assert not any(tmp_path.iterdir())


def test_argument_errors_exit_before_torch_is_imported(tmp_path: Path) -> None:
    """Torch takes seconds to import: config loading and argument checks must not need it."""
    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "bundle.json").write_text(json.dumps({"model_name": "fcos_resnet50_fpn", "classes": ["wbc"],
                                                      "task": "detect", "format_version": 2}))
    code = f"""
import sys
from leukoscope.engine.config import load_config
load_config(overrides=["train.lr=0.1", "search.lr=[0.1]"])
from leukoscope.cli import app
codes = []
for args in (["train", "--data", "missing/folder"], ["train", "--data", ".", "train.lrr=1"],
             ["search", "--data", "."], ["evaluate", "--bundle", "nope", "--data", "."],
             ["predict", "--bundle", {str(tmp_path)!r}, "x.png"], ["compare", "--data", "missing.csv"],
             ["export", "--bundle", "nope"], ["export", "--bundle", {str(detector)!r}],
             ["export", "--bundle", {str(detector)!r}, "--format", "tflite"],
             ["predict", "--bundle", {str(detector)!r}, "x.png", "--backend", "tensorrt"],
             ["analyze", "x.png", "--engine", "spark"], ["analyze", "x.png", "--address", "auto"],
             ["analyze", ".", "--backend", "tensorrt"],
             ["evaluate", "--bundle", {str(detector)!r}, "--data", ".", "--backend", "tensorrt"]):
    try:
        app(args)
    except SystemExit as exc:
        codes.append(exc.code)
print(codes, sorted(name for name in ("torch", "torchvision", "sklearn", "onnxruntime") if name in sys.modules))
"""
    assert fresh_python(code, cwd=tmp_path, timeout=120) == "[2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2] []"


def test_the_ray_engine_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    result = invoke("analyze", "x.png", "--engine", "ray")
    assert result.exit_code == 2
    assert "--engine ray needs ray: pip install 'leukoscope[ray]'" in " ".join(result.output.split())


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["user", "list"], ["user", "add", "ann", "--role",
                                                                                  "admin", "--password-stdin"]])
def test_the_web_service_commands_say_how_to_install_their_extra(command: list[str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the service extra (a plain `pip install leukoscope`) they had ended in a traceback of the first
    missing module; nothing is made in the data folder."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else find_spec(name, *a))
    result = invoke(*command, "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 2, result.output
    assert "the web service needs its extra (uvicorn not installed): pip install 'leukoscope[service]'" in " ".join(
        result.output.split())
    assert not (tmp_path / "data").exists()


def test_a_field_given_twice_is_analysed_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from leukoscope.inference.predict_files import collect_images

    folder = tmp_path / "fields"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    with caplog.at_level(logging.WARNING, logger="leukoscope.inference.predict_files"):
        paths = collect_images([folder / "b.png", folder, tmp_path / "fields" / ".." / "fields"])
    assert paths == [folder / "b.png", folder / "a.png"]  # each once, where first reached
    assert "3 file(s) given more than once are used once: a.png, b.png" in caplog.text


def test_a_broken_link_in_a_folder_is_reported_not_skipped(tmp_path: Path) -> None:
    """A link to an image that is gone (an unmounted share) was left out of a folder run without a word."""
    from leukoscope.inference.predict_files import collect_images

    folder = tmp_path / "fields"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "b.png").symlink_to(tmp_path / "gone" / "b.png")
    (folder / "notes.txt").symlink_to(tmp_path / "gone" / "notes.txt")
    assert collect_images([folder]) == [folder / "a.png", folder / "b.png"]
    result = invoke("analyze", folder, "--out", tmp_path / "out", "--no-classifier")
    said = " ".join(result.output.split())
    assert result.exit_code == 3, said  # a partial run: its results written, and a script can tell
    assert "b.png: not read" in said and "1 image(s) could not be read" in said
    assert "1 of 2 image(s) read, 0 white cells" in said  # the count is of the image read, and says so


def test_a_folder_analysed_again_does_not_read_its_earlier_results_as_fields(tmp_path: Path) -> None:
    """`cd fields && leukoscope analyze .` run twice analysed the first run's summary.png as a field (and a slide's
    overview, adding its 11 white cells to a pooled count of 1). Fields beside an analysis's files stay fields."""
    import csv
    import json

    folder = tmp_path / "fields"
    folder.mkdir()
    for shade, name in enumerate(("a.png", "b.png")):
        Image.new("RGB", (64, 64), (230, 200 + shade, 200)).save(folder / name)
    for out in (folder / "analysis", folder / "analysis", folder / "other", folder):  # the last: --out the input
        result = invoke("analyze", folder, "--out", out, "--no-classifier")
        said = " ".join(result.output.split())
        assert result.exit_code == 0, said
        with (out / "summary.csv").open() as handle:
            assert [Path(row["image"]).name for row in csv.DictReader(handle)] == ["a.png", "b.png", "TOTAL"]
    assert "2 picture(s) that earlier analyses wrote into the input folders left out" in said  # two summary.png
    left_out = json.loads((folder / "summary.json").read_text())["provenance"]["inputs_left_out"]
    assert sorted(left_out["written_by_an_earlier_analysis"]) == [str(folder / "analysis" / "summary.png"),
                                                                   str(folder / "other" / "summary.png")]
    # a field that happens to be called summary.png, in a folder no analysis wrote, is a field
    (tmp_path / "own").mkdir()
    Image.new("RGB", (64, 64), (230, 210, 200)).save(tmp_path / "own" / "summary.png")
    result = invoke("analyze", tmp_path / "own", "--out", tmp_path / "own-out", "--no-classifier")
    assert result.exit_code == 0, result.output
    with (tmp_path / "own-out" / "summary.csv").open() as handle:
        assert [Path(row["image"]).name for row in csv.DictReader(handle)] == ["summary.png", "TOTAL"]
    (folder / "a.png").unlink(), (folder / "b.png").unlink()
    for name in ("summary.png",):
        (folder / name).unlink()
    result = invoke("analyze", folder / "analysis", "--out", tmp_path / "third", "--no-classifier")
    assert result.exit_code == 2 and "is one an earlier analysis wrote" in " ".join(result.output.split())


def test_summary_names_the_files_of_each_field(tmp_path: Path) -> None:
    """Same-named fields of two subfolders write field.json and field-2.json, in the order they come: summary.csv
    said which row was which only by the image's path, and joined by name rows met the wrong files."""
    import csv
    import json

    for shade, folder in enumerate(("a", "b")):
        (tmp_path / "fields" / folder).mkdir(parents=True)
        Image.new("RGB", (64, 64), (230, 200 + shade, 200)).save(tmp_path / "fields" / folder / "field.png")
    result = invoke("analyze", tmp_path / "fields", "--out", tmp_path / "out", "--no-classifier")
    assert result.exit_code == 0, result.output
    with (tmp_path / "out" / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["output"] for row in rows] == ["field", "field-2", ""]  # the TOTAL row has no files
    for row in rows[:2]:
        assert json.loads((tmp_path / "out" / f"{row['output']}.json").read_text())["source"] == row["image"]
    fields = json.loads((tmp_path / "out" / "summary.json").read_text())["fields"]
    assert [field["output"] for field in fields] == ["field", "field-2"]


def test_an_image_too_small_to_be_a_field_says_so(tmp_path: Path) -> None:
    """A 1 x 1 image and an 8 x 480 strip were "analysed" as smear fields, with no warning."""
    import json

    from leukoscope.inference.quality import TINY_FIELD_WORDING

    for name, size in (("dot.png", (1, 1)), ("strip.png", (8, 480)), ("field.png", (64, 64))):
        Image.new("RGB", size, (230, 200, 200)).save(tmp_path / name)
    result = invoke("analyze", tmp_path / "dot.png", tmp_path / "strip.png", tmp_path / "field.png",
                    "--out", tmp_path / "out", "--no-classifier")
    assert result.exit_code == 0, result.output
    for stem, tiny in (("dot", True), ("strip", True), ("field", False)):
        warnings = json.loads((tmp_path / "out" / f"{stem}.json").read_text())["differential"]["warnings"]
        assert any(w.startswith(TINY_FIELD_WORDING) for w in warnings) is tiny, (stem, warnings)


def test_a_multi_page_field_says_in_its_record_that_one_page_was_read(tmp_path: Path) -> None:
    """"3 pages; only the first is read" was said on the console only, not kept in the field's JSON."""
    import json

    pages = [Image.new("RGB", (64, 64), (230, 200 + k, 200)) for k in range(3)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    result = invoke("analyze", tmp_path / "pages.tif", "--out", tmp_path / "out", "--no-classifier")
    assert result.exit_code == 0, result.output
    warnings = json.loads((tmp_path / "out" / "pages.json").read_text())["differential"]["warnings"]
    assert any(w.startswith("the file has 3 pages; only the first was analysed") for w in warnings), warnings


def test_a_field_with_a_long_name_is_analysed_under_a_shortened_one(tmp_path: Path) -> None:
    """A scanner's 250-character name stopped the folder run with "File name too long", the fields after it lost."""
    folder = tmp_path / "fields"
    folder.mkdir()
    long_names = ["slide_" + "x" * 240 + suffix for suffix in ("_1.png", "_2.png")]  # one long start, two fields
    for shade, name in enumerate(long_names):
        Image.new("RGB", (64, 64), (230, 200 + shade, 200)).save(folder / name)
    result = invoke("analyze", folder, "--out", tmp_path / "out", "--no-classifier")
    assert result.exit_code == 0, result.output
    written = sorted(path.name for path in (tmp_path / "out").glob("*.json") if path.name != "summary.json")
    assert len(written) == 2 and all(len(name) <= 200 for name in written)
    # a name that is no UTF-8 (bytes a Linux file system keeps as they are) is shortened too
    from leukoscope.inference.smear_output import MAX_STEM, unique_stem

    assert len(unique_stem(Path("x" * 200 + "\udcff.png"), set())) == MAX_STEM


def test_files_of_a_folder_not_taken_as_images_are_named(tmp_path: Path, caplog) -> None:
    """A .webp, a .gif and a JPEG without an extension were skipped without a word."""
    from leukoscope.inference.predict_files import collect_images

    folder = tmp_path / "fields"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (8, 8)).save(folder / "sub" / "b.webp")
    Image.new("RGB", (8, 8)).save(folder / "noext", format="JPEG")
    (folder / ".DS_Store").write_bytes(b"")  # hidden files and folders are not the user's images
    (folder / "Thumbs.db").write_bytes(b"")  # nor a system's (as in training's class folders)
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]")
    with caplog.at_level(logging.WARNING, logger="leukoscope.inference.predict_files"):
        assert collect_images([folder]) == [folder / "a.png"]
    assert f"{folder}: 2 file(s) left out, not named as BMP, JPEG, PNG or TIFF images: noext, sub/b.webp" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="leukoscope.inference.predict_files"):
        collect_images([folder / "a.png"])
    assert "left out" not in caplog.text


def test_an_empty_folder_is_refused_before_the_models_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke("analyze", tmp_path / "empty", "--out", tmp_path / "out")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "folder has no images" in said and "models:" not in said


def test_a_config_or_run_of_another_task_is_named_as_such(tmp_path: Path) -> None:
    """train-detector with a classifier's config (or run) printed some twenty "unknown config key" errors; a
    detector config with --split-file blamed an override the user never typed."""
    classify = tmp_path / "classify.yaml"
    classify.write_text("task: classify\nmodel:\n  name: abas_cnn\n")
    for command in ("train-detector", "mil"):
        result = invoke(command, "--config", classify)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "is a classify config (task: classify)" in said, result.output
        assert "unknown config key" not in said
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(classify.read_text())
    resumed = invoke("train-detector", "--resume", run)
    assert resumed.exit_code == 2 and "is a classify run" in " ".join(resumed.output.split())
    detect = tmp_path / "detect.yaml"
    detect.write_text("task: detect\n")
    split = invoke("train", "--config", detect, "--split-file", tmp_path / "s.json")
    assert split.exit_code == 2 and "--split-file applies to classifier training" in " ".join(split.output.split())


def test_option_values_are_refused_by_their_option_before_any_work(tmp_path: Path, synthetic_root: Path) -> None:
    """--on-corrupt ignore said "on_corrupt must be ..."; demo --minutes -1 blamed an override the user never
    typed after making the whole synthetic dataset; calibrate-ood --quantile 2 was refused after decoding."""
    bad = invoke("evaluate", "--bundle", "pretrained:wbc-classifier", "--data", synthetic_root,
                 "--on-corrupt", "ignore")
    assert bad.exit_code == 2 and "--on-corrupt must be skip or fail" in bad.output
    demo = invoke("demo", "--out", tmp_path / "demo", "--minutes", "-1")
    assert demo.exit_code == 2 and "--minutes must be above 0" in demo.output and not (tmp_path / "demo").exists()
    quantile = invoke("calibrate-ood", "--bundle", tmp_path / "nowhere", "--data", synthetic_root, "--quantile", "2")
    assert quantile.exit_code == 2 and "--quantile must be in [0.5, 1)" in quantile.output


def test_output_folders_that_are_files_are_refused_in_one_line(tmp_path: Path, synthetic_root: Path) -> None:
    """segment --out FILE, demo --out FILE and serve/user --data-dir FILE were tracebacks."""
    card = tmp_path / "card.txt"
    card.write_text("not a folder")
    for args in (["segment", synthetic_root / "blast", "--out", card], ["demo", "--out", card],
                 ["user", "list", "--data-dir", card], ["serve", "--data-dir", card]):
        result = invoke(*args)
        assert result.exit_code == 2 and "is a file, not a folder" in result.output, (args, result.output)
        assert "Traceback" not in result.output


def _deny_writes_under(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``os.access`` answering as on a read-only mount for ``folder`` and below: the tests may run as root,
    whom a folder's permission bits do not stop, and mounting needs privileges."""
    import os

    real = os.access

    def access(path, mode, *args, **kwargs) -> bool:
        if mode & os.W_OK and Path(path).resolve().is_relative_to(folder.resolve()):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_an_output_location_that_cannot_be_written_is_refused_in_one_line_before_any_work(
        trained_bundle: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only share or a folder without write permission was a traceback, for predict after every image had
    been classified."""
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_writes_under(monkeypatch, locked)
    images = synthetic_root / "blast"
    tiny = ["--model", "abas_cnn", "model.image_size=32", "train.epochs=1", "--quiet"]
    for args, option, shown in [
            (["train", "--data", synthetic_root, *tiny, f"output_root={locked / 'runs'}"], "output_root", "runs"),
            (["compare", "--data", synthetic_root, "--models", "abas_cnn", f"output_root={locked}"], "output_root", ""),
            (["search", "--data", synthetic_root, "search.lr=[0.1]", f"output_root={locked}"], "output_root", ""),
            (["split", "--data", synthetic_root, "--out", locked / "s.json"], "--out", "s.json"),
            (["evaluate", "--bundle", trained_bundle, "--data", synthetic_root, "--out", locked / "ev"], "--out", "ev"),
            (["predict", "--bundle", trained_bundle, images, "--out", locked / "p.csv"], "--out", "p.csv"),
            (["predict", "--bundle", trained_bundle, images, "--out", tmp_path / "p.csv", "--explain", locked / "x"],
             "--explain", "x"),
            (["analyze", images, "--out", locked / "an"], "--out", "an"),
            (["analyze", images, "--out", tmp_path / "an", "--cells", locked / "cells"], "--cells", "cells"),
            (["export", "--bundle", trained_bundle, "--format", "onnx", "--out", locked / "onnx"], "--out", "onnx"),
            (["segment", images, "--out", locked / "seg"], "--out", "seg"),
            (["demo", "--out", locked / "demo"], "--out", "demo")]:
        result = invoke(*args)
        said = " ".join(result.output.split())
        where = locked / shown if shown else locked
        assert result.exit_code == 2, (args, result.output)
        assert f"error: {option} {where}: cannot write there (no permission to write in {locked})" in said, said
        assert "Traceback" not in result.output and "predicting" not in result.output
    assert list(locked.iterdir()) == [] and not (tmp_path / "p.csv").exists() and not (tmp_path / "an").exists()


def test_a_frozen_split_on_a_read_only_share_is_read_not_refused(synthetic_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The split file is written only when it does not exist: one made once and kept read-only is what
    --split-file is for, and the write check had refused it."""
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    assert invoke("split", "--data", synthetic_root, "--out", frozen / "s.json").exit_code == 0
    _deny_writes_under(monkeypatch, frozen)
    result = invoke("train", "--data", synthetic_root, "--split-file", frozen / "s.json", "--model", "abas_cnn",
                    "model.image_size=32", "train.epochs=1", "--quiet", f"output_root={tmp_path / 'runs'}")
    assert result.exit_code == 0, result.output


def test_a_write_refused_late_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import typer

    from leukoscope.cli._common import call_or_exit, unwritable

    def write(path: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system", path)

    with pytest.raises(typer.Exit) as exit_:
        call_or_exit(write, "/mnt/share/p.csv")
    assert exit_.value.exit_code == 2
    with pytest.raises(OSError, match="No space"):  # not a refused write: a traceback, as before
        call_or_exit(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert unwritable(Path(".")) is None


def test_a_config_without_task_is_the_command_s_and_a_classical_run_resumes(synthetic_root: Path,
                                                                          tmp_path: Path) -> None:
    """The task check read a file without `task:` as a classifier's (the detection and MIL loaders default to
    their own task); the checkpoint check refused a classical run, which resumes by fitting again."""
    detect = tmp_path / "detect.yaml"
    detect.write_text("model:\n  name: fasterrcnn_mobilenet_v3_fpn\ntrain:\n  epochs: 1\n")
    result = invoke("train-detector", "--config", detect, "data.path=/nowhere")
    assert "is a classify config" not in " ".join(result.output.split()), result.output
    first = invoke("train", "--data", synthetic_root, "--model", "naive_bayes", "--quiet", f"output_root={tmp_path}",
                   "model.image_size=32", "features.histogram_bins=8", "features.lbp_radii=[1]",
                   "features.glcm_distances=[1]")
    assert first.exit_code == 0, first.output
    run_dir = Path(first.stdout.strip().splitlines()[-1]).parent
    finished = invoke("train", "--resume", run_dir, "--quiet")  # it refitted and overwrote its bundle in place
    assert finished.exit_code != 0 and "is a finished naive_bayes run" in " ".join(finished.output.split())
    import shutil

    shutil.rmtree(run_dir / "bundle")  # a run stopped before its bundle was written fits again
    again = invoke("train", "--resume", run_dir, "--quiet")
    assert again.exit_code == 0 and "no checkpoint.pt" not in again.output, again.output


@pytest.fixture(scope="module")
def mapped_bundle(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classical bundle (seconds to train) of two classes, made with data.class_map."""
    out = tmp_path_factory.mktemp("mapped-runs")
    result = invoke("train", "--data", synthetic_root, "--model", "naive_bayes", "--quiet", f"output_root={out}",
                    "model.image_size=32", "features.families=[histogram]",
                    "data.class_map={lymphocyte: normal, monocyte: normal, neutrophil: normal}")
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def test_evaluate_labels_the_data_as_the_bundle_was_trained(mapped_bundle: Path, synthetic_root: Path,
                                                            tmp_path: Path) -> None:
    """A bundle trained with data.class_map (three classes -> normal) could not be scored on its own data and
    split: 'the data has labels [...] that the model does not know'. Its recorded map now labels the data."""
    bundle = mapped_bundle
    trained = json.loads((bundle.parent / "metrics.json").read_text())
    scored = invoke("evaluate", "--bundle", bundle, "--data", synthetic_root, "--split-file",
                    bundle.parent / "split.json", "--out", tmp_path / "ev")
    assert scored.exit_code == 0, scored.output
    said = " ".join(scored.output.split())
    assert "labels mapped by the bundle's data.class_map:" in said and "monocyte -> normal" in said
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == trained["n"] and metrics["accuracy"] == pytest.approx(trained["accuracy"])
    assert metrics["classes"] == ["blast", "normal"] and metrics["labels_as_trained"]
    # the labels as written: the model does not know them
    written = invoke("evaluate", "--bundle", bundle, "--data", synthetic_root, "--split-file",
                     bundle.parent / "split.json", "--out", tmp_path / "ev2", "--no-class-map")
    assert written.exit_code == 2 and "that the model does not know" in written.output
    # a label the map does not name is still refused
    data = tmp_path / "other"
    (data / "eosinophil").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 100, 100)).save(data / "eosinophil" / "a.png")
    unknown = invoke("evaluate", "--bundle", bundle, "--data", data, "--out", tmp_path / "ev3")
    assert unknown.exit_code == 2 and "['eosinophil'] that the model does not know" in unknown.output
    # a slip of a label the map renames is refused naming it (it was refused as a class the model does not know)
    (data / "eosinophil").rename(data / "monocyt")
    slip = invoke("evaluate", "--bundle", bundle, "--data", data, "--out", tmp_path / "ev4")
    said = " ".join(slip.output.split())
    assert slip.exit_code == 2 and "'monocyt' looks like a misspelling of 'monocyte'" in said
    assert "data.class_map maps to 'normal'" in said


def test_calibrate_ood_labels_the_data_as_the_bundle_was_trained(mapped_bundle: Path, synthetic_root: Path,
                                                                 tmp_path: Path) -> None:
    """calibrate-ood of a bundle trained with data.class_map failed on its own data and split: 'labels the model
    does not know', as evaluate had."""
    import shutil

    bundle = Path(shutil.copytree(mapped_bundle, tmp_path / "bundle"))
    fitted = invoke("calibrate-ood", "--bundle", bundle, "--data", synthetic_root, "--quiet")
    assert fitted.exit_code == 0, fitted.output
    assert "labels mapped by the bundle's data.class_map" in " ".join(fitted.output.split())
    assert json.loads((bundle / "bundle.json").read_text())["ood"] is not None


def test_a_shared_split_file_works_on_a_copy_of_the_data(synthetic_root: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The README says to share a split file: on a colleague's copy of the data, train said '... new image(s),
    ... no longer in it: delete it' and evaluate 'no image ... is in the test part'."""
    import shutil

    mine = Path(shutil.copytree(synthetic_root, tmp_path / "mine"))
    made = invoke("split", "--data", mine, "--out", tmp_path / "s.json")
    assert made.exit_code == 0, made.output
    copy = Path(shutil.copytree(mine, tmp_path / "copy"))
    shutil.rmtree(mine)  # only the colleague's copy is there (the run read the split again after training)
    trained = invoke("train", "--data", copy, "--split-file", tmp_path / "s.json", "--model", "naive_bayes",
                     "--quiet", f"output_root={tmp_path / 'runs'}", "model.image_size=32",
                     "features.families=[histogram]")
    assert trained.exit_code == 0, trained.output
    assert f"its images are read under {copy.resolve()}" in caplog.text
    bundle = Path(trained.stdout.strip().splitlines()[-1])
    scored = invoke("evaluate", "--bundle", bundle, "--data", copy, "--split-file", tmp_path / "s.json",
                    "--out", tmp_path / "ev")
    assert scored.exit_code == 0, scored.output
    test_part = json.loads((tmp_path / "s.json").read_text())["splits"]["test"]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == len(test_part)


def test_evaluate_leaves_out_the_classes_the_bundle_was_trained_without(synthetic_root: Path,
                                                                        tmp_path: Path) -> None:
    result = invoke("train", "--data", synthetic_root, "--model", "naive_bayes", "--quiet",
                    f"output_root={tmp_path / 'runs'}", "model.image_size=32", "features.families=[histogram]",
                    "data.classes=[blast, neutrophil]")
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    new = tmp_path / "new"
    for label in ("blast", "neutrophil", "monocyte"):
        (new / label).mkdir(parents=True)
        for number in range(3):
            Image.new("RGB", (40, 40), (60 * number, 20 * len(label), 150)).save(new / label / f"{label}{number}.png")
    scored = invoke("evaluate", "--bundle", bundle, "--data", new, "--out", tmp_path / "ev")
    assert scored.exit_code == 0, scored.output
    said = " ".join(scored.output.split())
    assert "left out 3 image(s) of class(es) the bundle was trained without" in said and "monocyte (3)" in said
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 6
    (new / "monocyte").rename(new / "blsat")  # a typo of a class it knows is refused, not left out
    typo = invoke("evaluate", "--bundle", bundle, "--data", new, "--out", tmp_path / "ev2")
    assert typo.exit_code != 0 and not (tmp_path / "ev2" / "metrics.json").exists()
    assert "'blsat' looks like a misspelling of the model's class 'blast'" in " ".join(typo.output.split())
    (new / "blsat").rename(new / "promonocyte")  # a name of its own that contains a class's: left out, not a typo
    other = invoke("evaluate", "--bundle", bundle, "--data", new, "--out", tmp_path / "ev3")
    assert other.exit_code == 0 and "promonocyte (3)" in " ".join(other.output.split()), other.output


def test_evaluate_never_replaces_an_earlier_evaluation(mapped_bundle: Path, synthetic_root: Path,
                                                      tmp_path: Path) -> None:
    """An honest test-part score in eval-<data> was silently replaced by a later --allow-training-data score of
    all the images, written to the same default folder."""
    split = mapped_bundle.parent / "split.json"
    honest = invoke("evaluate", "--bundle", mapped_bundle, "--data", synthetic_root, "--split-file", split)
    assert honest.exit_code == 0, honest.output
    first = Path(honest.stdout.strip().splitlines()[-1]).parent
    assert first == mapped_bundle.parent / f"eval-{synthetic_root.name}"
    n_test = json.loads((first / "metrics.json").read_text())["n"]
    again = invoke("evaluate", "--bundle", mapped_bundle, "--data", synthetic_root, "--allow-training-data")
    assert again.exit_code == 0, again.output
    second = Path(again.stdout.strip().splitlines()[-1]).parent
    assert second == mapped_bundle.parent / f"eval-{synthetic_root.name}-2"
    assert f"{first} holds an earlier evaluation, kept; this one went to {second}" in " ".join(again.output.split())
    # an evaluation refused (training images without --allow-training-data) announces no folder it never writes
    training = invoke("evaluate", "--bundle", mapped_bundle, "--data", synthetic_root)
    assert training.exit_code == 2 and "of its train images" in training.output, training.output
    assert "holds an earlier evaluation" not in training.output
    assert not (mapped_bundle.parent / f"eval-{synthetic_root.name}-3").exists()
    assert json.loads((first / "metrics.json").read_text())["n"] == n_test  # the honest score is still there
    assert json.loads((second / "metrics.json").read_text())["n"] == 96
    # an explicit --out holding an evaluation: refused, unless --overwrite
    refused = invoke("evaluate", "--bundle", mapped_bundle, "--data", synthetic_root, "--allow-training-data",
                     "--out", first)
    assert refused.exit_code == 2 and "already holds an evaluation (metrics.json, report.html, scored_images.csv)" \
        in refused.output
    assert json.loads((first / "metrics.json").read_text())["n"] == n_test
    replaced = invoke("evaluate", "--bundle", mapped_bundle, "--data", synthetic_root, "--allow-training-data",
                      "--out", first, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((first / "metrics.json").read_text())["n"] == 96
    # --overwrite without --out: refused (it went to a new eval-<data>-3, the option silently ignored)
    ignored = invoke("evaluate", "--bundle", mapped_bundle, "--data", synthetic_root, "--allow-training-data",
                     "--overwrite")
    assert ignored.exit_code == 2 and "give --out FOLDER" in " ".join(ignored.output.split())
    assert not (mapped_bundle.parent / f"eval-{synthetic_root.name}-3").exists()


def test_split_train_and_evaluate_refuse_a_manifest_naming_missing_files(mapped_bundle: Path, synthetic_root: Path,
                                                                         tmp_path: Path) -> None:
    """One behaviour: the manifest, the count and a few of the missing paths (split and train said
    "[Errno 2] No such file or directory: '/nope/missing1.jpg'"; evaluate skipped them)."""
    images = sorted(synthetic_root.rglob("*.png"))[::2]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images)
                        + "/nope/missing1.jpg,blast\n/nope/missing2.jpg,monocyte\n")
    expected = f"{manifest}: 2 of its {len(images) + 2} rows name files that do not exist"
    for args in (["split", "--data", manifest, "--out", tmp_path / "s.json"],
                 ["train", "--data", manifest, "--model", "naive_bayes", f"output_root={tmp_path / 'runs'}",
                  "model.image_size=32", "features.families=[histogram]"],
                 ["evaluate", "--bundle", mapped_bundle, "--data", manifest, "--out", tmp_path / "ev"]):
        result = invoke(*args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and expected in said, (args[0], result.output)
        assert "/nope/missing1.jpg" in said and "/nope/missing2.jpg" in said and "Errno" not in said
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "ev").exists()
    assert not list((tmp_path / "runs").glob("*"))  # no run folder (nor split) left behind


def test_a_reused_split_file_wins_over_other_ratios_said_and_recorded(synthetic_root: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """`train --split-file s.json 'data.ratios=[0.5,0.25,0.25]' data.split_seed=3` said only "reusing split", and
    the run's config.yaml recorded ratios the split did not have."""
    import yaml

    split = tmp_path / "s.json"
    made = invoke("split", "--data", synthetic_root, "--out", split, "--ratios", "0.7,0.3", "--seed", "5")
    assert made.exit_code == 0, made.output
    common = ["--data", synthetic_root, "--split-file", split, "--model", "naive_bayes", "--quiet",
              f"output_root={tmp_path / 'runs'}", "model.image_size=32", "features.families=[histogram]"]
    result = invoke("train", *common, "data.ratios=[0.5,0.25,0.25]", "data.split_seed=3")
    assert result.exit_code == 0, result.output
    said = " ".join(caplog.text.split())  # a warning: on the terminal and in train.log
    assert (f"{split} was made with other settings than data.ratios=[0.5, 0.25, 0.25] (the split's: [0.7, 0.3]) "
            "and data.split_seed=3 (the split's: 5): its parts are used as they are") in said
    bundle = Path(result.stdout.strip().splitlines()[-1])
    for data in (yaml.safe_load((bundle.parent / "config.yaml").read_text())["data"],
                 json.loads((bundle / "bundle.json").read_text())["provenance"]["config"]["data"]):
        assert data["ratios"] == [0.7, 0.3] and data["split_seed"] == 5
    assert "was made with other settings" in (bundle.parent / "train.log").read_text()
    # nothing asked for: nothing to warn of, and the run still records the split's settings
    caplog.clear()
    quiet = invoke("train", *common)
    assert quiet.exit_code == 0 and "other settings" not in caplog.text, quiet.output
    recorded = yaml.safe_load((Path(quiet.stdout.strip().splitlines()[-1]).parent / "config.yaml").read_text())
    assert recorded["data"]["ratios"] == [0.7, 0.3] and recorded["data"]["split_seed"] == 5


def test_messages_name_what_the_command_accepts(mapped_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """train advised "--on-corrupt skip on the command line", an option it does not have; `--resume` of a missing
    folder said "config.yaml: cannot read the config file"."""
    data = tmp_path / "data"
    for label in ("blast", "neutrophil"):
        for image in sorted((synthetic_root / label).iterdir())[:6]:
            (data / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, data / label / image.name)
    (data / "blast" / "broken.png").write_bytes(b"not an image")
    failed = invoke("train", "--data", data, "--model", "naive_bayes", "--quiet", f"output_root={tmp_path / 'runs'}",
                    "model.image_size=32", "features.families=[histogram]", "data.on_corrupt=fail")
    said = " ".join(failed.output.split())
    assert failed.exit_code == 2 and "corrupt image in dataset" in said, failed.output
    assert "data.on_corrupt=skip, in the config or as an override on the command line" in said
    assert "--on-corrupt" not in said
    # evaluate has the option: it is the one named there
    scored = invoke("evaluate", "--bundle", mapped_bundle, "--data", data, "--on-corrupt", "fail",
                    "--allow-training-data", "--out", tmp_path / "ev")
    assert scored.exit_code == 2 and "with --on-corrupt skip)" in " ".join(scored.output.split()), scored.output
    gone, afile = tmp_path / "does-not-exist", data / "blast" / "broken.png"
    for folder, expected in ((gone, f"cannot resume: there is no run folder {gone}"),
                             (afile, f"cannot resume: {afile} is a file, not a run folder")):
        for command in ("train", "train-detector"):
            resumed = invoke(command, "--resume", folder)
            said = " ".join(resumed.output.split())
            assert resumed.exit_code == 2 and expected in said, resumed.output
            assert "cannot read the config file" not in said


def test_predict_warns_of_images_in_a_light_the_classifier_never_saw(tmp_path: Path) -> None:
    """The shipped classifier records its training images' light: a bluish camera's cell is named, as analyze
    names a field (tests/inference/test_cell_light.py checks the rule itself)."""
    from tests.inference.test_cell_light import BLUISH, _cell

    _cell(size=240).save(tmp_path / "taken.png")
    _cell(gains=BLUISH, size=240).save(tmp_path / "bluish.png")
    result = invoke("predict", "--bundle", "pretrained:wbc-classifier", tmp_path / "taken.png", tmp_path / "bluish.png",
                    "--um-per-px", "0.1", "--out", tmp_path / "p.csv", "--threads", "1")
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.output.splitlines() if "colour of light" in line]
    assert warning.startswith("warning: 1 image(s) have a background of a colour of light") and "bluish.png" in warning
    assert "taken.png" not in warning
    rows = {Path(row["source"]).name: row for row in csv.DictReader((tmp_path / "p.csv").open())}
    assert rows["bluish.png"]["warnings"].startswith("The image's light is unlike")
    assert "light" not in rows["taken.png"]["warnings"]
