"""Models shipped inside the package (``leukoscope.pretrained``): listing, ``pretrained:NAME``
wherever a bundle is taken, the default models of ``analyze``, and fine-tuning (``--init``).

The shipped folder is replaced by a temporary one (``LEUKOSCOPE_PRETRAINED_DIR``) holding the
tiny detector and classifier bundles of the detection tests under the default names."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from leukoscope.cli import app
from leukoscope.data.synthetic import render_cell
from leukoscope.pretrained import (DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, ENV_VARIABLE, PretrainedError, card_summary,
                                   list_pretrained, pretrained_path, resolve_bundle)

from tests.conftest import fresh_python
from tests.detection.conftest import classifier_bundle, detector_bundle, smear_root  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
CARD = """---
license: apache-2.0
---
# {name}

{summary}

## Data
Generated cells.

- Model: a long bullet that goes on well past the width of any terminal, about what the model learned from and
  why that matters, and it ends with the words that must reach the reader: research use only.
"""


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def shipped_dir(tmp_path_factory: pytest.TempPathFactory, detector_bundle: Path, classifier_bundle: Path) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    for name, bundle, summary in ((DEFAULT_DETECTOR, detector_bundle, "Finds white cells in smear fields."),
                                  (DEFAULT_CLASSIFIER, classifier_bundle, "Names the type of a white cell.")):
        shutil.copytree(bundle, root / name)
        (root / name / "MODEL_CARD.md").write_text(CARD.format(name=name, summary=summary))
    (root / "README.md").write_text("not a model\n")
    (root / "half-copied").mkdir()  # no bundle.json: not a model
    return root


@pytest.fixture
def shipped(shipped_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(ENV_VARIABLE, str(shipped_dir))
    return shipped_dir


@pytest.fixture
def nothing_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    empty = tmp_path / "empty-pretrained"
    empty.mkdir()
    monkeypatch.setenv(ENV_VARIABLE, str(empty))
    return empty


def weights(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / "model.safetensors"))


# ------------------------------------------------------------------ the module


def test_list_and_resolve_shipped_models(shipped: Path) -> None:
    models = {m.name: m for m in list_pretrained()}
    assert sorted(models) == [DEFAULT_DETECTOR, DEFAULT_CLASSIFIER]
    detector, classifier = models[DEFAULT_DETECTOR], models[DEFAULT_CLASSIFIER]
    assert (detector.task, classifier.task) == ("detect", "classify")
    assert detector.classes == ["WBC", "RBC", "Platelets"] and len(classifier.classes) == 4
    assert classifier.summary == "Names the type of a white cell."  # front matter and heading skipped
    assert classifier.card == shipped / DEFAULT_CLASSIFIER / "MODEL_CARD.md"
    assert classifier.size_bytes == sum(p.stat().st_size for p in classifier.path.iterdir())
    assert classifier.spec == "pretrained:wbc-classifier"
    assert resolve_bundle("pretrained:wbc-classifier") == shipped / DEFAULT_CLASSIFIER
    assert pretrained_path(DEFAULT_DETECTOR) == shipped / DEFAULT_DETECTOR
    assert resolve_bundle("runs/x/bundle") == Path("runs/x/bundle")  # any other value is a path
    with pytest.raises(PretrainedError, match=r"no shipped model 'nope'.*shipped: smear-detector, wbc-classifier"):
        resolve_bundle("pretrained:nope")
    with pytest.raises(PretrainedError, match="give a model name"):
        resolve_bundle("pretrained:")
    with pytest.raises(PretrainedError, match="give a model name"):
        resolve_bundle("pretrained:../elsewhere")


def test_an_empty_install_says_what_to_do(nothing_shipped: Path) -> None:
    assert list_pretrained() == []
    with pytest.raises(PretrainedError) as error:
        pretrained_path(DEFAULT_CLASSIFIER, option="--classifier")
    assert str(error.value).startswith("no shipped model 'wbc-classifier' in this install")
    assert str(error.value).endswith("give --classifier a bundle folder or retrain with python bench/zoo.py")


def test_card_summary_is_the_first_line_of_text(tmp_path: Path) -> None:
    card = tmp_path / "card.md"
    card.write_text("# Title\n\n<!-- generated -->\n## Sub\nFirst words.\nSecond line.\n")
    assert card_summary(card) == "First words."
    card.write_text("# Title\nTypes a cell: eight types and **blast**, at `24 um`.\n")
    assert card_summary(card) == "Types a cell: eight types and blast, at 24 um."
    card.write_text("# Only a heading\n")
    assert card_summary(card) == ""


def test_the_package_folder_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import leukoscope
    from leukoscope.pretrained import pretrained_root

    monkeypatch.delenv(ENV_VARIABLE, raising=False)
    assert pretrained_root() == Path(leukoscope.__file__).resolve().parent / "pretrained"
    assert (pretrained_root() / "README.md").is_file()  # keeps the (possibly empty) folder in git
    assert all(m.path.parent == pretrained_root() for m in list_pretrained())


# ------------------------------------------------------------------ the command line


def test_models_lists_the_shipped_models_and_prints_a_card(shipped: Path) -> None:
    listed = invoke("models", "--pretrained")
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}  # the answer: stdout
    assert lines["smear-detector"].split()[1:3] == ["detect", "3"]
    assert lines["wbc-classifier"].split()[1:3] == ["classify", "4"]
    assert "MB" in lines["wbc-classifier"] and "Names the type of a white cell." in lines["wbc-classifier"]
    assert "half-copied" not in listed.output
    card = invoke("models", "--card", "wbc-classifier")
    assert card.exit_code == 0, card.output
    assert "wbc-classifier" in card.stdout and "Names the type of a white cell." in card.stdout
    assert "Generated cells." in card.output and "## Data" not in card.output  # rendered, not raw Markdown
    assert "research use only" in " ".join(card.stdout.split())  # a long bullet is wrapped, not cropped
    unknown = invoke("models", "--card", "nope")
    assert unknown.exit_code == 2 and "no shipped model 'nope'" in unknown.output
    assert "shipped: smear-detector, wbc-classifier" in " ".join(unknown.output.split())
    assert invoke("models", "--card", "pretrained:smear-detector").exit_code == 0
    trainable = invoke("models")
    assert trainable.exit_code == 0 and "abas_cnn" in trainable.stdout and "wbc-classifier" not in trainable.output
    assert "{num_classes}" not in trainable.stdout


def test_a_card_table_keeps_every_name_whole_in_80_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rich cut the card's table cells to fit 80 columns: "taleqani-b…", "cnmc-all-o…". Names stay whole; the
    long verdicts wrap at spaces."""
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "bundle.json").write_text("{}")
    fails = "called_blast 0.071 (target <= 0.05): FAILS"
    rows = [("taleqani-benign", "760", "0.071", "-", "0.116", "0.718", fails),
            ("cnmc-all-on-background", "27", "0.000", "-", "1.000", "1.000", fails),
            ("cnmc-hem-on-background", "27", "0.000", "-", "1.000", "1.000", "-")]
    table = ["| cells | n | called blast | type accuracy | unfamiliar | OOD AUROC | verdict |",
             "|---|---:|---:|---:|---:|---:|---|", *("| " + " | ".join(row) + " |" for row in rows)]
    (tmp_path / "wide" / "MODEL_CARD.md").write_text("# wide\n\nA card with a wide table.\n\n" + "\n".join(table))
    monkeypatch.setenv(ENV_VARIABLE, str(tmp_path))
    card = runner.invoke(app, ["models", "--card", "wide"], env={"COLUMNS": "80"})
    assert card.exit_code == 0, card.output
    lines = card.stdout.splitlines()
    assert "…" not in card.stdout and max(len(line.rstrip()) for line in lines) <= 80
    for name, *_ in rows:
        assert any(line.split()[:1] == [name] for line in lines), name  # whole, on one line
    assert "FAILS" in card.stdout and "called_blast" in card.stdout  # the verdicts wrapped, not cut


def test_models_pretrained_on_an_empty_install(nothing_shipped: Path) -> None:
    result = invoke("models", "--pretrained")
    assert result.exit_code == 0 and "no shipped models in this install" in " ".join(result.output.split())


def fields_folder(smear_root: Path, tmp_path: Path, count: int = 2) -> Path:
    fields = tmp_path / "fields"
    fields.mkdir()
    for path in sorted((smear_root / "JPEGImages").glob("*.png"))[:count]:
        (fields / path.name).write_bytes(path.read_bytes())
    return fields


def test_analyze_without_model_flags_uses_the_shipped_models(shipped: Path, smear_root: Path,
                                                             tmp_path: Path) -> None:
    fields = fields_folder(smear_root, tmp_path)
    result = invoke("analyze", fields, "--out", tmp_path / "out", "--quiet", "--threads", "1")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"detector pretrained:smear-detector ({shipped / DEFAULT_DETECTOR})" in output
    assert f"classifier pretrained:wbc-classifier ({shipped / DEFAULT_CLASSIFIER})" in output
    assert len(list((tmp_path / "out").glob("*.cells.csv"))) == 2
    # the classifier named the cells: its classes, not the detector's
    labels = {row["label"] for path in (tmp_path / "out").glob("*.cells.csv") for row in csv.DictReader(path.open())}
    assert labels and not labels & {"WBC", "RBC", "Platelets"}

    kept = invoke("analyze", fields, "--out", tmp_path / "kept", "--quiet", "--no-classifier")
    assert kept.exit_code == 0, kept.output
    assert "classifier none (detector classes)" in " ".join(kept.output.split())
    same = invoke("analyze", fields, "--out", tmp_path / "same", "--quiet", "--classifier", "none")
    assert same.exit_code == 0 and "classifier none" in same.output
    assert "holds an earlier run's results" not in same.output
    # a second run into the same folder: its summary lists this run's fields only, and the console says so
    again = invoke("analyze", next(fields.iterdir()), "--out", tmp_path / "same", "--quiet", "--classifier", "none")
    assert again.exit_code == 0 and "holds an earlier run's results" in " ".join(again.output.split())
    both = invoke("analyze", fields, "--no-classifier", "--classifier", "pretrained:wbc-classifier")
    assert both.exit_code == 2 and "contradict" in both.output


def test_analyze_without_shipped_models_fails_clearly(nothing_shipped: Path, smear_root: Path, tmp_path: Path,
                                                      detector_bundle: Path) -> None:
    fields = fields_folder(smear_root, tmp_path, count=1)
    result = invoke("analyze", fields, "--out", tmp_path / "out")
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "no shipped model 'smear-detector' in this install" in output
    assert "give --detector a bundle folder or retrain with python bench/zoo.py" in output
    assert not (tmp_path / "out").exists()
    # a detector of one's own without a shipped classifier: cells keep the detector's classes, said so
    own = invoke("analyze", fields, "--detector", detector_bundle, "--out", tmp_path / "own", "--quiet")
    assert own.exit_code == 0, own.output
    assert "no shipped wbc-classifier in this install: cells keep the detector's classes" in " ".join(own.output.split())
    missing = invoke("analyze", fields, "--detector", detector_bundle, "--classifier", "pretrained:wbc-classifier")
    assert missing.exit_code == 2 and "give --classifier a bundle folder or retrain" in " ".join(missing.output.split())


def test_predict_and_evaluate_take_pretrained_names(shipped: Path, synthetic_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "preds.csv"
    result = invoke("predict", "--bundle", "pretrained:wbc-classifier", synthetic_root / "blast", "--out", out)
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader(out.open()))) == len(list((synthetic_root / "blast").iterdir()))
    monkeypatch.chdir(tmp_path)  # a shipped model's evaluation goes to the working folder, not into the package
    evaluated = invoke("evaluate", "--bundle", "pretrained:wbc-classifier", "--data", synthetic_root)
    assert evaluated.exit_code == 0, evaluated.output
    report = Path(evaluated.stdout.strip().splitlines()[-1])
    assert report.resolve() == (tmp_path / f"eval-wbc-classifier-{synthetic_root.name}" / "report.html").resolve()
    assert not list((shipped / DEFAULT_CLASSIFIER).glob("eval-*")) and not list(shipped.glob("eval-*"))
    shutil.rmtree(report.parent)
    by_path = invoke("evaluate", "--bundle", shipped / DEFAULT_CLASSIFIER, "--data", synthetic_root)
    assert by_path.exit_code == 0, by_path.output  # given by its folder's path: to the working folder as well
    assert report.is_file() and not list(shipped.glob("eval-*"))
    wrong = invoke("predict", "--bundle", "pretrained:smear-detector", synthetic_root / "blast")
    assert wrong.exit_code == 2 and "needs a cell classifier bundle" in wrong.output
    unknown = invoke("predict", "--bundle", "pretrained:nope", synthetic_root / "blast")
    assert unknown.exit_code == 2 and "no shipped model 'nope'" in unknown.output
    assert "give --bundle a bundle folder" in unknown.output  # it said "pass --bundle" to one who had


def test_bundle_readers_take_pretrained_names(shipped: Path) -> None:
    from leukoscope.bundle import load_bundle, read_bundle_info

    assert read_bundle_info("pretrained:smear-detector").task == "detect"
    model, info = load_bundle("pretrained:wbc-classifier", task="classify")
    assert info.model_name == "abas_cnn" and not model.training


def test_service_settings_take_pretrained_names(shipped: Path) -> None:
    from leukoscope.service.settings import ServiceSettings

    settings = ServiceSettings.from_env({"LEUKOSCOPE_BUNDLE": "pretrained:wbc-classifier"},
                                        detector="pretrained:smear-detector")
    assert settings.bundle == shipped / DEFAULT_CLASSIFIER and settings.detector == shipped / DEFAULT_DETECTOR
    with pytest.raises(ValueError, match="no shipped model 'nope'"):
        ServiceSettings(bundle="pretrained:nope")


def test_calibrate_ood_leaves_a_shipped_model_alone(shipped: Path, synthetic_root: Path) -> None:
    result = invoke("calibrate-ood", "--bundle", "pretrained:wbc-classifier", "--data", synthetic_root, "--quiet")
    assert result.exit_code == 2 and "copy its folder" in " ".join(result.output.split())
    # the same model by its folder's path (as the refusal prints it) was calibrated in place
    by_path = invoke("calibrate-ood", "--bundle", shipped / DEFAULT_CLASSIFIER, "--data", synthetic_root, "--quiet")
    assert by_path.exit_code == 2 and "copy its folder" in " ".join(by_path.output.split())
    assert not (shipped / DEFAULT_CLASSIFIER / "ood.safetensors").exists()


def test_a_shipped_model_is_never_exported_into_the_package(shipped: Path, synthetic_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The advice of a backend without a graph names an export to a folder of its own, and an export of a
    shipped model's folder (given as a path) will not write beside it, inside the installed package."""
    cell = next(synthetic_root.rglob("*.png"))
    advised = invoke("predict", cell, "--bundle", f"pretrained:{DEFAULT_CLASSIFIER}", "--backend", "onnxruntime",
                     "--out", tmp_path / "p.csv")
    said = " ".join(advised.output.split())
    assert advised.exit_code == 2, advised.output
    assert (f"run `leukoscope export --bundle pretrained:{DEFAULT_CLASSIFIER} --format onnx --out "
            f"{DEFAULT_CLASSIFIER}-onnx` first and give {DEFAULT_CLASSIFIER}-onnx as the bundle") in said
    for out in (["--out", shipped / "beside-it"], ["--out", shipped / DEFAULT_CLASSIFIER],
                ["--out", shipped / DEFAULT_CLASSIFIER / "onnx"]):
        refused = invoke("export", "--bundle", shipped / DEFAULT_CLASSIFIER, "--format", "onnx", *out)
        assert refused.exit_code == 2, (out, refused.output)
        assert "shipped model" in refused.output or "inside the installed package" in refused.output, refused.output
    monkeypatch.chdir(tmp_path)  # by default, the working folder, as for pretrained:NAME
    exported = invoke("export", "--bundle", shipped / DEFAULT_CLASSIFIER, "--format", "onnx")
    assert exported.exit_code == 0 and (tmp_path / f"{DEFAULT_CLASSIFIER}-onnx" / "model.onnx").is_file()
    assert sorted(p.name for p in shipped.iterdir()) == sorted([DEFAULT_DETECTOR, DEFAULT_CLASSIFIER, "README.md",
                                                                "half-copied"])


def test_bad_names_fail_before_torch_is_imported(tmp_path: Path) -> None:
    code = """
import sys
from leukoscope.cli import app
codes = []
for args in (["predict", "--bundle", "pretrained:nope", "x.png"], ["analyze", "x.png"],
             ["evaluate", "--bundle", "pretrained:wbc-classifier", "--data", "."],
             ["train", "--init", "pretrained:nope", "--data", "."], ["train", "--data", ".", "model.init=pretrained:x"]):
    try:
        app(args)
    except SystemExit as exc:
        codes.append(exc.code)
print(codes, sorted(name for name in ("torch", "torchvision", "sklearn") if name in sys.modules))
"""
    (tmp_path / "empty").mkdir()
    assert fresh_python(code, cwd=tmp_path, env={ENV_VARIABLE: str(tmp_path / "empty")}, timeout=120) == "[2, 2, 2, 2, 2] []"


def test_an_unknown_init_name_is_not_answered_with_pass_init(shipped: Path) -> None:
    """`train --init pretrained:nope` said "... pass --init or retrain": the user had passed --init."""
    for args in (["--init", "pretrained:nope"], ["model.init=pretrained:nope"]):
        result = invoke("train", "--data", ".", *args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "no shipped model 'nope' in this install" in said, said
        assert "pass --init" not in said and "pass model.init" not in said, said
    said = " ".join(invoke("train", "--data", ".", "--init", "pretrained:nope").output.split())
    assert "give --init a bundle folder or retrain with python bench/zoo.py" in said, said


# ------------------------------------------------------------------ fine-tuning


def test_init_config_takes_the_architecture_from_the_bundle(shipped: Path, tmp_path: Path,
                                                            detector_bundle: Path) -> None:
    from leukoscope.engine.config import ConfigError, load_config
    from leukoscope.engine.detection_config import load_detection_config

    config = load_config(None, ["model.init=pretrained:wbc-classifier"])
    assert (config.model.name, config.model.image_size) == ("abas_cnn", 48)
    assert config.model.options == {"dropout": 0.0} and config.model.init == "pretrained:wbc-classifier"
    assert load_config(None, ["model.init=pretrained:wbc-classifier", "model.image_size=64"]).model.image_size == 64
    with pytest.raises(ConfigError, match="is a abas_cnn bundle, but model.name is resnet18"):
        load_config(None, ["model.init=pretrained:wbc-classifier", "model.name=resnet18"])
    with pytest.raises(ConfigError, match="is a cell detector bundle"):
        load_config(None, ["model.init=pretrained:smear-detector"])
    with pytest.raises(ConfigError, match="drop model.weights"):
        load_config(None, ["model.init=pretrained:wbc-classifier", "model.weights=x.pt"])
    with pytest.raises(ConfigError, match="no shipped model 'nope'"):
        load_config(None, ["model.init=pretrained:nope"])
    # in a file: a relative folder is resolved against the file's folder, a pretrained name is kept
    shutil.copytree(shipped / DEFAULT_CLASSIFIER, tmp_path / "models" / "mine")
    (tmp_path / "a.yaml").write_text("model:\n  init: models/mine\n")
    assert load_config(tmp_path / "a.yaml").model.init == str((tmp_path / "models" / "mine").resolve())
    (tmp_path / "b.yaml").write_text("model:\n  init: pretrained:wbc-classifier\n")
    assert load_config(tmp_path / "b.yaml").model.init == "pretrained:wbc-classifier"
    detection = load_detection_config(None, ["model.init=pretrained:smear-detector"])
    assert detection.model.name == "fasterrcnn_abas" and detection.model.options["input_scale"] == 0.5


def test_a_head_is_loaded_or_left_new(classifier_bundle: Path) -> None:
    from leukoscope.engine.finetune import class_difference
    from leukoscope.models import WithoutHead, create_model

    saved = weights(classifier_bundle)
    kept = create_model("abas_cnn", num_classes=4, weights=classifier_bundle / "model.safetensors").state_dict()
    new = create_model("abas_cnn", num_classes=4, weights=WithoutHead(classifier_bundle / "model.safetensors"))
    assert torch.equal(kept["classifier.6.weight"], saved["classifier.6.weight"])
    assert torch.equal(new.state_dict()["features.0.weight"], saved["features.0.weight"])
    assert not torch.equal(new.state_dict()["classifier.6.weight"], saved["classifier.6.weight"])
    # the head's hidden layer is learned, not a class name: fine-tuning on other classes keeps it
    other = create_model("abas_cnn", num_classes=3, weights=WithoutHead(classifier_bundle / "model.safetensors"))
    assert torch.equal(other.state_dict()["classifier.4.weight"], saved["classifier.4.weight"])
    assert torch.equal(other.state_dict()["classifier.1.weight"], saved["classifier.1.weight"])
    assert other.state_dict()["classifier.6.weight"].shape[0] == 3
    assert class_difference(["a", "b"], ["a", "b"]) is None
    assert class_difference(["a", "b", "c"], ["a", "d"]) == ("only in the data: ['d']; only in the bundle: ['b', 'c']; "
                                                            "the new classifier will not know b, c")
    assert "another order" in class_difference(["b", "a"], ["a", "b"])
    # a lab's normal cells alone: the blast class goes, and it is said what that costs; a folder spelled
    # otherwise is named as the bundle's class (it would be a class of its own)
    said = class_difference(["blast", "lymphocyte", "neutrophil"], ["Neutrophil", "lymphocyte"])
    assert "'Neutrophil' is its 'neutrophil'" in said and "will not know blast;" in said
    assert "calls no cell a blast, and `analyze` cannot screen for leukemia with it" in said
    # the lab's own blast class (by another name) keeps the screen: nothing of the kind said
    assert "calls no cell a blast" not in class_difference(["blast", "lymphocyte"], ["lymphoblast", "lymphocyte"])


def test_a_lost_class_counted_apart_from_white_cells_is_said_to_become_a_white_cell() -> None:
    """Without platelets or nucleated red cells in the data, `analyze` calls them white cells: said, with what
    to do; not said when the data keeps its own (by another name) or loses only white-cell classes."""
    from leukoscope.engine.finetune import class_difference

    bundle = ["basophil", "erythroblast", "lymphocyte", "neutrophil", "platelet"]
    said = class_difference(bundle, ["basophil", "lymphocyte", "neutrophil"])
    assert "without erythroblast, platelet `analyze` calls each such cell the detector boxes one of the " \
           "white-cell classes and counts it as a white cell" in said
    assert "differential's denominator" in said and "instead of excluding them" in said
    # each kind apart: keeping nucleated red cells (as nrbc) does not keep the platelets apart
    one_kind = class_difference(bundle, ["basophil", "lymphocyte", "nrbc"])
    assert "without platelet `analyze` calls each such cell" in one_kind and "erythroblast `analyze`" not in one_kind
    assert "counts it as a white cell" not in class_difference(bundle, ["erythroblast", "lymphocyte", "platelet"])


@pytest.mark.parametrize("name", ["abas_cnn", "mobilenet_v2"])
def test_fine_tuning_on_other_classes_keeps_the_shared_rows_of_the_class_layer(name: str, tmp_path: Path) -> None:
    """The class layer's rows (weights and bias) of the classes the data shares with the bundle are the
    bundle's, in the data's order; a new class's row is initialised afresh; every other tensor is loaded."""
    from safetensors.torch import save_file

    from leukoscope.engine.finetune import head_rows, keep_head_rows
    from leukoscope.models import WithoutHead, create_model

    layer = {"abas_cnn": "classifier.6", "mobilenet_v2": "classifier.1"}[name]
    bundle_model = create_model(name, num_classes=4)
    save_file({k: v.contiguous() for k, v in bundle_model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    saved = weights(tmp_path)
    rows = head_rows(["a", "b", "c", "d"], ["d", "new", "b"])
    assert rows == [3, None, 1]
    model = create_model(name, num_classes=3, weights=WithoutHead(tmp_path / "model.safetensors"))
    fresh = model.state_dict()[f"{layer}.weight"][1].clone()
    assert keep_head_rows(model, tmp_path / "model.safetensors", rows, 4) == layer
    state = model.state_dict()
    for new, old in ((0, 3), (2, 1)):
        assert torch.equal(state[f"{layer}.weight"][new], saved[f"{layer}.weight"][old])
        assert torch.equal(state[f"{layer}.bias"][new], saved[f"{layer}.bias"][old])
    assert torch.equal(state[f"{layer}.weight"][1], fresh)
    assert torch.equal(state["features.0.weight" if name == "abas_cnn" else "features.0.0.weight"],
                       saved["features.0.weight" if name == "abas_cnn" else "features.0.0.weight"])


def test_a_class_layer_without_a_row_per_class_is_left_as_built(tmp_path: Path) -> None:
    """jabeena_cnn's two-class head has one output (not a row per class): nothing is copied, and None says so."""
    from safetensors.torch import save_file

    from leukoscope.engine.finetune import keep_head_rows
    from leukoscope.models import create_model

    save_file({k: v.contiguous() for k, v in create_model("jabeena_cnn", num_classes=3).state_dict().items()},
              str(tmp_path / "model.safetensors"))
    binary = create_model("jabeena_cnn", num_classes=2)
    before = {k: v.clone() for k, v in binary.state_dict().items()}
    assert keep_head_rows(binary, tmp_path / "model.safetensors", [0, 2], 3) is None
    assert all(torch.equal(before[k], v) for k, v in binary.state_dict().items())


FINE_TUNE = ["train.epochs=1", "train.lr=1e-9", "train.batch_size=16", "train.threads=1", "--quiet"]


def test_fine_tuning_on_the_same_classes_keeps_the_head(shipped: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """lr 0: every trained tensor of the new bundle is the shipped model's, head included."""
    from leukoscope.data.fingerprints import DIGESTS_FILE, read_training_digests, write_training_digests

    learned_from = tmp_path / "a photograph it learned from.png"
    learned_from.write_bytes(b"pixels")
    write_training_digests(shipped / DEFAULT_CLASSIFIER, {"train": [learned_from]}, of="crop sources")
    try:
        result = invoke("train", "--init", "pretrained:wbc-classifier", "--data", synthetic_root,
                        f"output_root={tmp_path / 'runs'}", "train.keep_checkpoint=true", *FINE_TUNE)
        base = read_training_digests(shipped / DEFAULT_CLASSIFIER)
    finally:
        (shipped / DEFAULT_CLASSIFIER / DIGESTS_FILE).unlink()
    assert result.exit_code == 0, result.output
    assert "same classes, its head is kept" in " ".join(result.output.split())
    bundle = Path(result.stdout.strip().splitlines()[-1])
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["model_name"] == "abas_cnn" and info["preprocessing"]["image_size"] == 48
    assert info["provenance"]["config"]["model"]["init"] == "pretrained:wbc-classifier"
    before, after = weights(shipped / DEFAULT_CLASSIFIER), weights(bundle)
    assert torch.allclose(before["classifier.6.weight"], after["classifier.6.weight"], atol=1e-6)
    # what the shipped model learned from is this one's training data too: evaluate refuses it as well
    own = read_training_digests(bundle)
    assert base and own["crop sources"]["train"] == base["crop sources"]["train"] and own["images"]["train"]
    assert torch.allclose(before["features.0.weight"], after["features.0.weight"], atol=1e-6)
    # the run resumes from its config.yaml (which names the shipped model, and what came from it)
    refused = invoke("train", "--resume", bundle.parent, "--init", "pretrained:wbc-classifier")
    assert refused.exit_code == 2 and "--init cannot change" in refused.output
    resumed = invoke("train", "--resume", bundle.parent, "train.epochs=2", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert [row["epoch"] for row in json.loads((bundle.parent / "history.json").read_text())] == [1, 2]


def window_bundle(classifier_bundle: Path, folder: Path, window_um: float = 24.0) -> Path:
    """A copy of ``classifier_bundle`` that learned cells cut ``window_um`` wide (as the shipped classifier did)."""
    bundle = Path(shutil.copytree(classifier_bundle, folder))
    info = json.loads((bundle / "bundle.json").read_text())
    info["preprocessing"]["cell_window_um"] = window_um
    (bundle / "bundle.json").write_text(json.dumps(info))
    return bundle


def test_the_window_note_is_said_under_quiet_and_kept_in_train_log(classifier_bundle: Path, synthetic_root: Path,
                                                                    tmp_path: Path) -> None:
    """The note that the init bundle learned cells cut at a window, and that training images are taken as they
    are, was printed only with progress bars: --quiet (no progress bars) hid it, and train.log never had it."""
    init = window_bundle(classifier_bundle, tmp_path / "window")
    result = invoke("train", "--init", init, "--data", synthetic_root, f"output_root={tmp_path / 'runs'}",
                    *FINE_TUNE)
    assert result.exit_code == 0, result.output
    note = f"{init} learned cells cut 24 um wide"
    assert note in " ".join(result.output.split())
    bundle = Path(result.stdout.strip().splitlines()[-1])
    assert note in " ".join((bundle.parent / "train.log").read_text().split())
    assert json.loads((bundle / "bundle.json").read_text())["preprocessing"]["cell_window_um"] == 24.0
    # a bundle that records nothing it learned from: said in the report, not warned of at every run
    checked = json.loads((bundle.parent / "metrics.json").read_text())["init_training_overlap"]
    said = " ".join(result.output.split())
    assert checked["parts"] == {} and "cannot be checked" in checked["note"]
    assert "which this run starts from" not in said


def test_fine_tuning_scored_on_what_the_init_bundle_learned_from_says_so(classifier_bundle: Path,
                                                                          synthetic_root: Path, tmp_path: Path) -> None:
    """`train --init` scored its test part on the init bundle's own training images without a word, where
    `evaluate` refuses them: now a warning (console and train.log), the overlap per part in metrics.json, and the
    report beside the score. A warning, not a refusal: fine-tuning on data a shipped model learned is legitimate."""
    from leukoscope.data.fingerprints import write_training_digests

    init = Path(shutil.copytree(classifier_bundle, tmp_path / "init")).resolve()
    data = shutil.copytree(synthetic_root, tmp_path / "cells")  # a copy: known by content, not by path
    write_training_digests(init, {"train": sorted(synthetic_root.rglob("*.png"))}, of="crop sources")
    result = invoke("train", "--init", init, "--data", data, f"output_root={tmp_path / 'runs'}", *FINE_TUNE)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert (f"warning: {init}, which this run starts from, was trained (or chose its epoch) on images of this "
            f"run's val part (") in said
    assert "this run's test score is not one of new images" in said and f"not new to {init}" in said
    bundle = Path(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((bundle.parent / "metrics.json").read_text())
    sizes, overlap = metrics["split_sizes"], metrics["init_training_overlap"]
    assert overlap["bundle"] == str(init)
    assert overlap["parts"] == {part: {"train sources": sizes[part]} for part in ("val", "test")}
    logged = " ".join((bundle.parent / "train.log").read_text().split())
    assert "this run's test score is not one of new images" in logged
    report = (bundle.parent / "report.html").read_text()
    assert "test score is not one of new images" in report and "some learned by the model it started" in report


def export_cells(root: Path, layout: str, cases: int = 8) -> Path:
    """Reviewed cells laid out as the service's dataset export writes them (service/export.py
    export_dataset): ``folders``: ``<label>/case-<id>-cell-<n>.png``; ``csv``: ``images/...`` plus
    ``manifest.csv`` with the case as subject."""
    rng = np.random.default_rng(5)
    rows = []
    cell = 0
    for case in range(1, cases + 1):
        case_id = f"c{case:04d}ab"
        for label in ("lymphocyte", "monocyte", "lymphocyte", "monocyte"):
            cell += 1
            member = f"{label}/case-{case_id}-cell-{cell}.png" if layout == "folders" else \
                f"images/case-{case_id}-cell-{cell}.png"
            (root / member).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_cell(label, rng, 40)).save(root / member)
            rows.append({"path": member, "label": label, "subject": case_id, "case": case_id, "cell": cell,
                         "predicted": "lymphocyte", "top_class": "lymphocyte", "confidence": 0.9,
                         "reviewed_at": "2026-01-01T00:00:00"})
    if layout == "csv":
        with (root / "manifest.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return root / "manifest.csv"
    return root


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_fine_tuning_on_a_review_export_keeps_the_shared_head_rows(layout: str, classifier_bundle: Path,
                                                                   tmp_path: Path) -> None:
    """The reviewed-labels export is a training set as it is; other classes than the bundle's: its
    backbone is loaded, and its class layer, sized for the export's classes, keeps the bundle's rows of them."""
    data = export_cells(tmp_path / "export", layout)
    result = invoke("train", "--init", classifier_bundle, "--data", data, f"output_root={tmp_path / 'runs'}",
                    *FINE_TUNE)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert ("on other classes: only in the bundle: ['blast', 'neutrophil']; the new classifier will not know blast, "
            "neutrophil; without blast it calls no cell a blast") in output
    assert "its backbone is loaded, and its class layer (classifier.6) keeps the bundle's rows of lymphocyte, " \
           "monocyte" in output
    bundle = Path(result.stdout.strip().splitlines()[-1])
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["classes"] == ["lymphocyte", "monocyte"] and info["model_name"] == "abas_cnn"
    before, after = weights(classifier_bundle), weights(bundle)
    assert torch.allclose(before["features.0.weight"], after["features.0.weight"], atol=1e-6)
    assert after["classifier.6.weight"].shape == (2, 60)
    rows = [json.loads((classifier_bundle / "bundle.json").read_text())["classes"].index(c) for c in info["classes"]]
    assert torch.allclose(before["classifier.6.weight"][rows], after["classifier.6.weight"], atol=1e-6)  # lr 1e-9
    train_log = (bundle.parent / "train.log").read_text()
    assert "keeps the bundle's rows of lymphocyte, monocyte" in train_log
    if layout == "csv":  # the manifest's subject is the case: the cells of one case stay in one part
        parts = json.loads((bundle.parent / "split.json").read_text())["splits"]
        cases = {part: {row["subject"] for row in rows} for part, rows in parts.items()}
        assert all(cases.values()) and sum(map(len, cases.values())) == 8


def test_a_run_on_few_cells_of_few_cases_says_so(tmp_path: Path) -> None:
    """An export of 3 cases: the classes under 10 training images, and the cases it has, are named; a score on
    under 10 images is said to be one."""
    run = ["--model", "abas_cnn", "model.image_size=32", "train.epochs=1", "train.threads=1", "--quiet"]
    result = invoke("train", "--data", export_cells(tmp_path / "csv", "csv", cases=3),
                    f"output_root={tmp_path / 'runs'}", *run)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "few images of lymphocyte, monocyte: under 10 each to train on (a class is hardly learned" in said
    assert ("needed about 10-20 a class); per class, training images / all images / split groups "
            "(a subject or case, or an image of none, with the images duplicating it): lymphocyte 6/6/3, "
            "monocyte 6/6/3") in said
    assert "too few images, or subjects and cases, to split: 12 images in 3 split group(s)" in said
    # file names alone name no case: each image is its own group, and a test part of 1 image is dealt
    result = invoke("train", "--data", export_cells(tmp_path / "folders", "folders", cases=3),
                    f"output_root={tmp_path / 'runs'}", *run)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "(1 image: too few (under 10) for the score to say much)" in said
    report = (Path(result.stdout.strip().splitlines()[-1]).parent / "report.html").read_text()
    assert "too few to say how the model does on new images" in report


def test_fine_tuning_a_detector(shipped: Path, smear_root: Path, tmp_path: Path) -> None:
    """--init with a detector bundle trains a detector; in the bundle's class order its class layer is kept."""
    result = invoke("train", "--init", "pretrained:smear-detector", "--data", smear_root,
                    "data.classes=[WBC, RBC, Platelets]", f"output_root={tmp_path / 'runs'}", "train.epochs=1",
                    "train.lr=1e-9", "train.batch_size=4", "train.threads=1", "train.warmup_iters=1", "--quiet")
    assert result.exit_code == 0, result.output
    assert "same classes, its head is kept" in " ".join(result.output.split())
    bundle = Path(result.stdout.strip().splitlines()[-1])
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["task"] == "detect" and info["model_name"] == "fasterrcnn_abas"
    before, after = weights(shipped / DEFAULT_DETECTOR), weights(bundle)
    head = "roi_heads.box_predictor.cls_score.weight"
    assert torch.allclose(before[head], after[head], atol=1e-6)


def test_detector_class_layer_is_new_for_other_classes(detector_bundle: Path) -> None:
    from leukoscope.engine.detection_config import load_detection_config
    from leukoscope.tasks.detect import build_detector

    config = load_detection_config(None, [f"model.init={detector_bundle}"])
    model = build_detector(config, ["Platelets", "RBC", "WBC"])  # the same classes, in another order
    saved, built = weights(detector_bundle), model.state_dict()
    assert torch.equal(saved["backbone.features.0.weight"], built["backbone.features.0.weight"])
    assert not torch.equal(saved["roi_heads.box_predictor.cls_score.weight"],
                           built["roi_heads.box_predictor.cls_score.weight"])


# ------------------------------------------------------------------ packaging


@pytest.mark.slow
def test_the_wheel_ships_the_models(tmp_path: Path) -> None:
    """A model folder under src/leukoscope/pretrained/ ends up in the wheel (bundle.json,
    model.safetensors, MODEL_CARD.md; nothing else). Built from a copy of the source tree."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE", "MANIFEST.in"):
        shutil.copy(REPO / name, source / name)
    model = source / "src" / "leukoscope" / "pretrained" / "tiny-model"
    model.mkdir(parents=True, exist_ok=True)
    for name in ("bundle.json", "model.safetensors", "MODEL_CARD.md", "notes.txt"):
        (model / name).write_text("{}")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    import zipfile

    (wheel,) = (tmp_path / "wheel").glob("leukoscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("leukoscope/pretrained/")}
    # The tiny model's three files (not notes.txt), and every file of the models already installed.
    installed = {f"leukoscope/{path.relative_to(source / 'src' / 'leukoscope').as_posix()}"
                 for path in (source / "src" / "leukoscope" / "pretrained").glob("*/*")
                 if path.suffix in (".json", ".safetensors", ".md") and path.parent.name != "tiny-model"}
    assert shipped == {"leukoscope/pretrained/README.md", "leukoscope/pretrained/LICENSES.md",
                       "leukoscope/pretrained/tiny-model/bundle.json",
                       "leukoscope/pretrained/tiny-model/model.safetensors",
                       "leukoscope/pretrained/tiny-model/MODEL_CARD.md"} | installed
    assert "leukoscope/pretrained.py" in names
    # the licences beside the metadata: the code's, and the weights' own terms (research use only)
    licences = {n.split("/licenses/", 1)[1] for n in names if "dist-info/licenses/" in n}
    assert licences == {"LICENSE", "NOTICE", "src/leukoscope/pretrained/LICENSES.md"}


def test_serve_defaults_to_the_shipped_models(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`leukoscope serve` with no model configured serves the shipped classifier and detector."""
    import typer

    from leukoscope.cli.service import _shipped_service_models
    from leukoscope.service.settings import ServiceSettings

    settings = _shipped_service_models(ServiceSettings())
    assert settings.bundle == shipped / DEFAULT_CLASSIFIER and settings.detector == shipped / DEFAULT_DETECTOR
    own = _shipped_service_models(ServiceSettings(detector=shipped / DEFAULT_DETECTOR / ".."))
    assert own.detector == shipped / DEFAULT_DETECTOR / ".."  # a configured detector stays
    monkeypatch.setenv(ENV_VARIABLE, str(shipped / "half-copied"))
    with pytest.raises(typer.Exit) as stopped:
        _shipped_service_models(ServiceSettings())
    assert stopped.value.exit_code == 2


def test_serve_with_a_classifier_of_ones_own_still_serves_the_shipped_detector(shipped: Path) -> None:
    """`serve --bundle <fine-tuned>` had loaded no detector (smear fields refused, nothing said at start-up): the
    shipped detector now serves beside any classifier unless --no-detector, and a line says what is served."""
    from leukoscope.cli.service import _shipped_service_models
    from leukoscope.progress import console
    from leukoscope.service.settings import ServiceSettings

    own_classifier = shipped / DEFAULT_CLASSIFIER / ".."  # a bundle of one's own, as a path
    with console.capture() as captured:
        settings = _shipped_service_models(ServiceSettings(bundle=own_classifier))
    assert settings.bundle == own_classifier and settings.detector == shipped / DEFAULT_DETECTOR
    said = " ".join(captured.get().split())
    assert f"smear fields: detector {shipped / DEFAULT_DETECTOR} (shipped)" in said
    assert f"classifier: {own_classifier}" in said and f"{own_classifier} (shipped)" not in said
    with console.capture() as captured:
        off = _shipped_service_models(ServiceSettings(bundle=own_classifier, detector=shipped / DEFAULT_DETECTOR),
                                      no_detector=True)
    assert off.detector is None
    assert "smear fields: off (--no-detector)" in " ".join(captured.get().split())
    both = CliRunner().invoke(app, ["serve", "--no-detector", "--detector", str(shipped / DEFAULT_DETECTOR)])
    assert both.exit_code == 2 and "contradict" in both.output


@pytest.mark.parametrize(("arch", "prefixes", "layer"), [
    ("abas_cnn", ("classifier.",), "classifier.6"), ("tusar_convnet", ("classifier.",), "classifier.5"),
    ("mobilenet_v2", ("classifier.",), "classifier.1"), ("mobilenet_v3_small", ("classifier.",), "classifier.3"),
    ("resnet18", ("fc.",), "fc"), ("densenet121", ("classifier",), "classifier")])
def test_the_class_layer_is_the_heads_last(arch: str, prefixes: tuple[str, ...], layer: str) -> None:
    from leukoscope.models import create_model
    from leukoscope.models.weights import class_layer

    assert class_layer(create_model(arch, num_classes=3), prefixes) == layer


def test_fine_tuning_names_images_of_another_size_than_the_rest(classifier_bundle: Path, synthetic_root: Path,
                                                                 tmp_path: Path) -> None:
    """A lab's own set comes from one microscope: a whole field among its 64 px cell crops is named (every image
    is brought to one input size, so its cells would look four times smaller), not taken in silence."""
    import shutil

    from PIL import Image

    data = tmp_path / "cells"
    shutil.copytree(synthetic_root, data)
    Image.open(sorted((data / "blast").glob("*.png"))[0]).resize((400, 300)).save(data / "blast" / "whole-field.png")
    result = invoke("train", "--init", classifier_bundle, "--data", data, f"output_root={tmp_path / 'runs'}",
                    *FINE_TUNE)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "1 of 97 images are over 4 times larger or smaller than the median (64 px a side)" in said
    assert "(whole-field.png)" in said
    # cells cut at one physical window from fields at two magnifications differ in pixels, rightly: not named
    Image.open(sorted((data / "blast").glob("*.png"))[1]).resize((290, 290)).save(data / "blast" / "at-100x.png")
    (data / "blast" / "whole-field.png").unlink()
    windowed = invoke("train", "--init", classifier_bundle, "--data", data, f"output_root={tmp_path / 'runs-2'}",
                      "data.cell_window_um=24", *FINE_TUNE)
    assert windowed.exit_code == 0, windowed.output
    said = " ".join(windowed.output.split())
    assert "learned cells cut 24 um wide" in said and "times larger or smaller" not in said
    assert "not square" not in said
    # ...but a whole field among them is not square, whatever its size: named (the shipped classifier has a window)
    Image.open(sorted((data / "blast").glob("*.png"))[2]).resize((400, 300)).save(data / "blast" / "field-2.png")
    fielded = invoke("train", "--init", classifier_bundle, "--data", data, f"output_root={tmp_path / 'runs-3'}",
                     "data.cell_window_um=24", *FINE_TUNE)
    assert fielded.exit_code == 0, fielded.output
    said = " ".join(fielded.output.split())
    assert "1 of 98 images are not square" in said and "(field-2.png)" in said
