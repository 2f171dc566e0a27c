from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.data.voc import read_voc_dataset
from leukoscope.engine.config import ConfigError
from leukoscope.engine.detection_config import load_detection_config
from leukoscope.engine.detection_data import DetectionTorchDataset, collate_detection_batch
from leukoscope.tasks.detect import build_detector
from leukoscope.models import create_model

runner = CliRunner()
TINY_RUN = ["model.name=fasterrcnn_abas", "train.epochs=1", "train.batch_size=4", "train.eval_every=1",
            "train.augmentation=default", "train.threads=2",
            "model.options={input_scale: 0.5, roi_batch_size: 32, detections_per_img: 30}"]


def test_a_few_steps_reduce_the_loss(smear_root: Path) -> None:
    torch.manual_seed(0)
    dataset = read_voc_dataset(smear_root, classes=["WBC", "RBC", "Platelets"])
    images, targets = collate_detection_batch([DetectionTorchDataset(dataset.images[:2], dataset.classes)[i] for i in range(2)])
    inputs = [image.float() / 255 for image in images]
    model = create_model("fasterrcnn_abas", num_classes=3, input_scale=0.5, roi_batch_size=32).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = sum(model(inputs, list(targets)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_detection_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="unknown detection augmentation"):
        load_detection_config(None, ["train.augmentation=spin"])
    path = tmp_path / "c.yaml"
    path.write_text("task: detection\ndata:\n  path: data/voc\nmodel:\n  name: fasterrcnn_abas\n")
    cfg = load_detection_config(path)
    assert cfg.data.path == str((tmp_path / "data" / "voc").resolve())
    for name in ("detector_cbc.yaml", "system_a_fasterrcnn.yaml"):
        cfg = load_detection_config(Path(__file__).resolve().parents[2] / "configs" / name)
        assert cfg.task == "detect" and cfg.data.train == "Training+Validation"
    recipe = load_detection_config(Path(__file__).resolve().parents[2] / "configs" / "system_a_fasterrcnn.yaml")
    assert (recipe.train.optimizer, recipe.train.batch_size, recipe.train.epochs, recipe.train.lr) == ("adam", 8, 50, 0.01)
    misspelt = load_detection_config(None, ["model.name=fasterrcnn_abas", "model.options={input_sacle: 0.5}"])
    with pytest.raises(ConfigError, match="no option 'input_sacle'.*did you mean 'input_scale'"):
        build_detector(misspelt, 3)


def test_train_resume_evaluate_cli(smear_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train-detector", "--data", str(smear_root), "--quiet",
                                 f"output_root={tmp_path / 'runs'}", *TINY_RUN, "train.keep_checkpoint=true"])
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    run_dir = bundle.parent
    for name in ("config.yaml", "split.json", "checkpoint.pt", "metrics.json", "report.html", "train.log",
                 "figures/pr_curves.png", "figures/counts.png", "figures/examples.png"):
        assert (run_dir / name).exists(), name
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["task"] == "detect" and info["classes"] == ["Platelets", "RBC", "WBC"]
    # smear analysis's quality gate reads the test AP@0.5 that training recorded in bundle.json
    from leukoscope.inference.quality import detector_warnings

    ap = info["metrics"]["ap_50_per_class"]["WBC"]
    gate = detector_warnings(info["metrics"], ["WBC"], floor=0.9)
    assert gate == ([] if ap >= 0.9 else [f"The detector's recorded test AP@0.5 for WBC is {ap:.3f}, below the floor "
                                          f"of 0.9: white cells may be missed or invented."])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test" and 0.0 <= metrics["map_50"] <= 1.0
    assert set(metrics["per_class"]) == {"Platelets", "RBC", "WBC"}

    resumed = runner.invoke(app, ["train-detector", "--resume", str(run_dir), "--quiet", "train.epochs=2"])
    assert resumed.exit_code == 0, resumed.output
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    # the folder changed since: cut again, the split would move images trained on into the test part
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(smear_root, changed)
    next(changed.rglob("*.xml")).unlink()
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace(str(smear_root), str(changed)))
    refused = runner.invoke(app, ["train-detector", "--resume", str(run_dir), "--quiet", "train.epochs=3"])
    assert refused.exit_code == 2 and "the data changed since this run started" in " ".join(refused.output.split())
    (run_dir / "config.yaml").write_text(config)
    # without its split.json a resume was not checked at all (and wrote a new one): refused, nothing written
    split = (run_dir / "split.json").read_bytes()
    (run_dir / "split.json").unlink()
    gone = runner.invoke(app, ["train-detector", "--resume", str(run_dir), "--quiet", "train.epochs=3"])
    assert gone.exit_code == 2 and (f"a resumed run continues on the split it trained on; restore "
                                    f"{run_dir / 'split.json'} or start a new run") in " ".join(gone.output.split())
    assert not (run_dir / "split.json").exists()
    (run_dir / "split.json").write_bytes(split)

    evaluated = runner.invoke(app, ["evaluate", "--bundle", str(bundle), "--data", str(smear_root),
                                    "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    assert (tmp_path / "eval" / "report.html").is_file()
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["n_images"] == 10
    # the folder holds its training images, known by content: the console and the report say so
    assert scored["training_overlap"].get("train", 0) > 0
    assert "include the detector's training images" in " ".join(evaluated.output.split())
    assert "says nothing about new images" in (tmp_path / "eval" / "report.html").read_text()

    bad = runner.invoke(app, ["train-detector", "--data", str(smear_root), "train.epoch=1"])
    assert bad.exit_code == 2 and "did you mean" in bad.output


def test_analyze_cli(smear_root: Path, detector_bundle: Path, classifier_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    fields = tmp_path / "fields"
    fields.mkdir()
    for path in sorted((smear_root / "JPEGImages").glob("*.png"))[:3]:
        (fields / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(app, ["analyze", str(fields), "--detector", str(detector_bundle),
                                 "--classifier", str(classifier_bundle), "--out", str(out), "--quiet",
                                 "--blast-class", "blast", "--threshold", "0.4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert len(list(out.glob("*.annotated.png"))) == 3
    assert len(list(out.glob("*.cells.csv"))) == 3 and len(list(out.glob("smear_*.json"))) == 3
    assert (out / "summary.csv").is_file() and (out / "summary.json").is_file()
    # an untrained detector records no test AP: a loud warning, and too few cells for a percentage
    assert "flag: WARNING:" in result.output and "acute leukemia" not in result.output
    summary_line = next(line for line in result.output.splitlines() if "image(s)," in line)
    assert "%" not in summary_line and "too few cells for a blast percentage" in summary_line
    bad_floor = runner.invoke(app, ["analyze", str(fields), "--detector", str(detector_bundle),
                                    "--min-detector-ap", "1.5"])
    assert bad_floor.exit_code == 2 and "min_detector_ap" in bad_floor.output
    missing = runner.invoke(app, ["analyze", str(tmp_path / "nothing"), "--detector", str(detector_bundle)])
    assert missing.exit_code == 2
    wrong = runner.invoke(app, ["analyze", str(fields), "--detector", str(classifier_bundle)])
    assert wrong.exit_code == 2 and "needs a cell detector bundle" in wrong.output


def test_a_fine_tuned_detector_keeps_its_bases_training_record(smear_root: Path, detector_bundle: Path,
                                                                tmp_path: Path) -> None:
    """Fine-tuned from a base that learned these very images (CBC's smears are BCCD's), its test score is
    flagged, and its bundle records the base's training images too, so `evaluate` warns on them later."""
    import shutil

    from leukoscope.data.fingerprints import digest_overlap, read_training_digests, write_training_digests

    base = tmp_path / "base"
    shutil.copytree(detector_bundle, base)
    images = sorted(p for p in smear_root.rglob("*.png"))
    write_training_digests(base, {"train": images})
    result = runner.invoke(app, ["train", "--init", str(base), "--data", str(smear_root), "--quiet",
                                 f"output_root={tmp_path / 'runs'}", "train.epochs=1", "train.batch_size=4",
                                 "train.threads=1", "train.warmup_iters=1", "train.lr=1e-9"])
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    assert digest_overlap(read_training_digests(bundle), images)["train"] == len(images)
    notes = " ".join((bundle.parent / "report.html").read_text().split())
    assert "fine-tuned from, learned from" in notes and "overstates it on new images" in notes


def test_cosine_schedule_follows_the_time_budget_when_it_ends_first() -> None:
    from leukoscope.engine.optim import TrainingClock, build_scheduler

    def factor(clock: TrainingClock, step: int) -> float:  # the detector's schedule: cosine to a 2% floor
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return build_scheduler(optimizer, "cosine", clock, floor=0.02).lr_lambdas[0](step)

    clock = TrainingClock(total_steps=6000, max_minutes=10)
    clock.step = 100  # few steps done ...
    assert factor(clock, clock.step) > 0.99
    clock.resume_from(elapsed_s=10 * 60, step=100)  # ... but the whole budget spent: annealed to the floor
    assert factor(clock, clock.step) == pytest.approx(0.02)
    no_budget = TrainingClock(total_steps=6000, max_minutes=None)
    no_budget.resume_from(elapsed_s=10 * 60, step=3000)  # without a budget only the steps count
    assert factor(no_budget, 3000) == pytest.approx(0.51)


def test_a_run_cut_by_its_time_budget_ends_annealed(smear_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train-detector", "--data", str(smear_root), "--quiet",
                                 f"output_root={tmp_path / 'runs'}", *TINY_RUN, "train.epochs=50",
                                 "train.warmup_iters=0", "train.lr=0.001", "train.max_minutes=0.000001"])
    assert result.exit_code == 0, result.output
    history = json.loads((Path(result.stdout.strip().splitlines()[-1]).parent / "history.json").read_text())
    assert len(history) == 1  # stopped after the first batch of 50 epochs ...
    assert history[0]["lr"] == pytest.approx(0.001 * 0.02)  # ... with the schedule at its floor
    bad = runner.invoke(app, ["train-detector", "--data", str(smear_root), "train.max_minutes=0"])
    assert bad.exit_code == 2 and "max_minutes" in bad.output


def test_train_with_a_detector_name_trains_a_detector(smear_root: Path, tmp_path: Path,
                                                     synthetic_root: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(smear_root), "--quiet", f"output_root={tmp_path / 'runs'}",
                                 *TINY_RUN])
    assert result.exit_code == 0, result.output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((bundle / "bundle.json").read_text())["task"] == "detect"
    assert bundle.parent.name.startswith("fasterrcnn_abas-")
    # a class-folder tree is no detection data: one line, no traceback, no run folder left
    wrong = runner.invoke(app, ["train", "--data", str(synthetic_root), "--model", "fasterrcnn_abas",
                                f"output_root={tmp_path / 'wrong'}"])
    assert wrong.exit_code == 2 and "Traceback" not in wrong.output, wrong.output
    assert not (tmp_path / "wrong").exists() or not any((tmp_path / "wrong").iterdir())
    predict = runner.invoke(app, ["predict", "--bundle", str(bundle), str(smear_root)])
    assert predict.exit_code == 2 and "is a cell detector" in predict.output


def test_detector_training_is_seeded(smear_root: Path, tmp_path: Path) -> None:
    """The same config and seed train the same detector (model initialisation included)."""
    from leukoscope.tasks.detect import run_detection_experiment

    config = load_detection_config(None, [f"data.path={smear_root}", f"output_root={tmp_path}", *TINY_RUN,
                                          "train.threads=1"])
    first, second = (run_detection_experiment(config, show_progress=False) for _ in range(2))
    losses = [[row["train_loss"] for row in run.fit.history] for run in (first, second)]
    assert losses[0] == losses[1]


def test_detectors_and_classifiers_refuse_each_others_options(detector_bundle: Path, classifier_bundle: Path,
                                                             smear_root: Path, synthetic_root: Path,
                                                             tmp_path: Path) -> None:
    detector = runner.invoke(app, ["evaluate", "--bundle", str(detector_bundle), "--data", str(smear_root),
                                   "--allow-training-data"])
    assert detector.exit_code == 2 and "--allow-training-data does not apply" in detector.output
    classifier = runner.invoke(app, ["evaluate", "--bundle", str(classifier_bundle), "--data", str(synthetic_root),
                                     "--split", "Testing"])
    assert classifier.exit_code == 2 and "--split does not apply" in classifier.output
    # a detector named in a classification config: one line, not a traceback from the classifier trainer
    config = tmp_path / "classify.yaml"
    config.write_text(f"data: {{path: {synthetic_root}}}\noutput_root: {tmp_path / 'runs'}\n")
    wrong = runner.invoke(app, ["train", "--config", str(config), "--model", "fasterrcnn_abas"])
    assert wrong.exit_code == 2 and "is a cell detector" in wrong.output and "Traceback" not in wrong.output
    assert not (tmp_path / "runs").exists() or [p.name for p in (tmp_path / "runs").iterdir()] == ["splits"]


def test_the_detectors_own_split_keeps_a_fields_copies_on_one_side(tmp_path: Path) -> None:
    """A field saved again as JPEG (a copy a lab's export makes) was dealt to training and to test alike: the
    test AP that lets `analyze` raise a leukemia flag was scored on a field the detector had learned. Where the
    user names the parts, such a copy is said in the run's notes."""
    from PIL import Image

    from leukoscope.data.synthetic_smears import SmearSpec, make_synthetic_smears
    from leukoscope.engine.detection_config import DetectionDataConfig
    from leukoscope.engine.detection_data import prepare_detection_data

    root = tmp_path / "voc"
    make_synthetic_smears(root, 10, SmearSpec(width=320, height=240, seed=4))
    Image.open(root / "JPEGImages" / "smear_0000.png").convert("RGB").save(root / "JPEGImages" / "copy.jpg", quality=92)
    (root / "Annotations" / "copy.xml").write_text(
        (root / "Annotations" / "smear_0000.xml").read_text().replace("smear_0000.png", "copy.jpg"))
    sides = set()
    for seed in range(12):
        splits = prepare_detection_data(DetectionDataConfig(path=str(root), ratios=[0.6, 0.2, 0.2], split_seed=seed))
        where = {image.image_path.name: part for part, data in splits.parts.items() for image in data}
        assert where["smear_0000.png"] == where["copy.jpg"]
        assert {part: len(data) for part, data in splits.parts.items()}["test"] in (2, 3)  # ~20% of 11 fields
        sides.add(where["copy.jpg"])
    assert len(sides) > 1  # dealt at random, together
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(f"smear_{n:04d}" for n in range(8)))
    (root / "ImageSets" / "Main" / "test.txt").write_text("copy\nsmear_0009\n")
    named = prepare_detection_data(DetectionDataConfig(path=str(root), train="train", test="test"))
    assert any("1 of 2 test images are near copies of training images (re-encoded, resized or turned: copy.jpg)"
               in note for note in named.notes)


def _zero_area_boxes(root: Path, files: int) -> None:
    """Add to ``files`` annotation files a box with no area (an annotation problem that leaves the image in)."""
    for xml in sorted((root / "Annotations").glob("*.xml"))[:files]:
        xml.write_text(xml.read_text().replace(
            "</annotation>", "<object><name>RBC</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax>"
                             "<ymax>9</ymax></bndbox></object>\n</annotation>"))


def test_every_annotation_problem_of_a_training_run_is_kept_in_its_folder(smear_root: Path, tmp_path: Path) -> None:
    """The report listed 5 of 7 problems and '...': the others were nowhere in the run folder."""
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(smear_root, root)
    _zero_area_boxes(root, 7)
    result = runner.invoke(app, ["train-detector", "--data", str(root), "--quiet", f"output_root={tmp_path / 'runs'}",
                                 *TINY_RUN])
    assert result.exit_code == 0, result.output
    run_dir = Path(result.stdout.strip().splitlines()[-1]).parent
    issues = json.loads((run_dir / "metrics.json").read_text())["annotation_issues"]
    assert sorted(Path(i["source"]).name for i in issues) == sorted(p.name for p in
                                                                   sorted((root / "Annotations").glob("*.xml"))[:7])
    assert all("has no area" in i["message"] for i in issues)
    report = " ".join((run_dir / "report.html").read_text().split())
    assert "7 annotation problem(s) skipped" in report
    assert "and 2 more: every one is in metrics.json (annotation_issues)" in report


def test_an_image_without_annotation_is_named_in_training_and_evaluation(smear_root: Path, detector_bundle: Path,
                                                                          tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """An image whose XML was lost was left out of training and evaluate without a word ("on 9 images")."""
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(smear_root, root)
    (root / "Annotations" / "smear_0003.xml").unlink()
    evaluated = runner.invoke(app, ["evaluate", "--bundle", str(detector_bundle), "--data", str(root),
                                    "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    assert "1 image(s) without an annotation file left out: smear_0003.png" in caplog.text  # on the console
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["n_images"] == 9 and [Path(p).name for p in scored["unannotated_images"]] == ["smear_0003.png"]
    assert [Path(i["source"]).name for i in scored["annotation_issues"]] == ["smear_0003.png"]
    assert "1 image(s) without an annotation file left out" in (tmp_path / "eval" / "report.html").read_text()
    trained = runner.invoke(app, ["train-detector", "--data", str(root), "--quiet", f"output_root={tmp_path / 'runs'}",
                                  *TINY_RUN])
    assert trained.exit_code == 0, trained.output
    run_dir = Path(trained.stdout.strip().splitlines()[-1]).parent
    assert "smear_0003" not in (run_dir / "split.json").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [Path(p).name for p in metrics["unannotated_images"]] == ["smear_0003.png"]
    assert "without an annotation file left out (not scored or trained on as fields without cells): smear_0003.png" \
        in " ".join((run_dir / "report.html").read_text().split())


def _rename_a_box(xml: Path, old: str, new: str) -> None:
    text = xml.read_text()
    assert f"<name>{old}</name>" in text
    xml.write_text(text.replace(f"<name>{old}</name>", f"<name>{new}</name>", 1))


def test_an_image_with_a_box_of_an_unknown_class_is_left_out_of_training_and_evaluation(
        smear_root: Path, detector_bundle: Path, tmp_path: Path) -> None:
    """A WBC written `Leukocyte` was dropped and its image kept: evaluate scored the detector's right box on it
    as a false one (WBC AP 1.000 -> 0.916), training taught the cell as background. The image is now left out,
    as one with a box outside it; a class left out on purpose (data.classes a subset) is no problem."""
    import shutil

    from leukoscope.engine.detection_config import DetectionDataConfig
    from leukoscope.engine.detection_data import prepare_detection_data

    root = tmp_path / "voc"
    shutil.copytree(smear_root, root)
    _rename_a_box(root / "Annotations" / "smear_0002.xml", "WBC", "Leukocyte")
    splits = prepare_detection_data(DetectionDataConfig(path=str(root), classes=["WBC", "RBC", "Platelets"],
                                                        ratios=[1.0]))
    assert len(splits.parts["train"]) == 9 and "smear_0002" not in json.dumps(splits.describe())
    assert any("smear_0002.xml" in i.source and "unknown class 'Leukocyte'" in i.message for i in splits.issues)
    only_wbc = prepare_detection_data(DetectionDataConfig(path=str(root), classes=["WBC"], ratios=[1.0]))
    assert len(only_wbc.parts["train"]) == 9  # RBC and Platelets are left out on purpose, not Leukocyte
    aliased = prepare_detection_data(DetectionDataConfig(path=str(root), classes=["WBC"], ratios=[1.0],
                                                         aliases={"Leukocyte": "WBC"}))
    assert len(aliased.parts["train"]) == 10 and not aliased.issues

    evaluated = runner.invoke(app, ["evaluate", "--bundle", str(detector_bundle), "--data", str(root),
                                    "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["n_images"] == 9
    assert "smear_0002.png" not in [row["image"] for row in scored["operating_point"]["per_image_counts"]]
    assert any("unknown class 'Leukocyte'" in i["message"] for i in scored["annotation_issues"])
    # a bundle trained with the alias reads its data with it
    bundle = tmp_path / "aliased-bundle"
    shutil.copytree(detector_bundle, bundle)
    info = json.loads((bundle / "bundle.json").read_text())
    info.setdefault("provenance", {})["config"] = {"data": {"aliases": {"Leukocyte": "WBC"}, "ignore_classes": []}}
    (bundle / "bundle.json").write_text(json.dumps(info))
    evaluated = runner.invoke(app, ["evaluate", "--bundle", str(bundle), "--data", str(root),
                                    "--out", str(tmp_path / "eval-aliased")])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "eval-aliased" / "metrics.json").read_text())["n_images"] == 10


def test_a_folder_with_splits_asks_for_the_settings_that_name_them(detector_bundle: Path, tmp_path: Path) -> None:
    """`train --data cbc-like --model <detector>` stopped with 'choose a split (Testing, Training, Validation)':
    the settings that choose them are named now, for training and for evaluate."""
    from PIL import Image

    root = tmp_path / "voc"
    for split in ("Training", "Validation", "Testing"):
        (root / split / "Images").mkdir(parents=True)
        Image.new("RGB", (160, 120), (230, 210, 220)).save(root / split / "Images" / "a.png")
        (root / split / "Annotations").mkdir()
        (root / split / "Annotations" / "a.xml").write_text(
            "<annotation><filename>a.png</filename><object><name>WBC</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>40</xmax><ymax>40</ymax></bndbox></object></annotation>")
    trained = runner.invoke(app, ["train", "--data", str(root), "--model", "fasterrcnn_abas", "--quiet",
                                  f"output_root={tmp_path / 'runs'}"])
    assert trained.exit_code == 2 and "Traceback" not in trained.output
    assert ("has the splits Testing, Training, Validation: name the ones to use, e.g. data.train=Training "
            "data.test=Testing (and data.val=Validation to choose the epoch and threshold on)"
            in " ".join(trained.output.split()))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    evaluated = runner.invoke(app, ["evaluate", "--bundle", str(detector_bundle), "--data", str(root),
                                    "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 2
    assert "choose the one to score on with --split, e.g. --split Testing" in " ".join(evaluated.output.split())
