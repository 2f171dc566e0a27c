"""System C: the Jabeena CNN, its sigmoid output, edge-detected copies and its config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from leukoscope.edges import edge_maps, with_edge_copies
from leukoscope.engine.config import load_config
from leukoscope.tasks.classify import run_experiment
from leukoscope.inference.explain import grad_cam
from leukoscope.models import create_model, model_entry

REPO = Path(__file__).resolve().parents[2]


def test_registered_as_a_classifier_with_five_fully_connected_layers():
    assert model_entry("jabeena_cnn").kind == "classifier"
    model = create_model("jabeena_cnn", num_classes=2)
    linear = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert len(linear) == 5
    assert linear[-1].out_features == 1  # one sigmoid unit for two classes
    assert any(isinstance(m, nn.MaxPool2d) for m in model.features)


def test_two_class_logits_are_a_sigmoid_in_disguise():
    torch.manual_seed(0)
    model = create_model("jabeena_cnn", num_classes=2).eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        z = model.classifier(model.pool(model.features(x)))[:, 0]
    assert logits.shape == (5, 2)
    torch.testing.assert_close(torch.softmax(logits, dim=1)[:, 1], torch.sigmoid(z))
    targets = torch.tensor([0, 1, 1, 0, 1])
    torch.testing.assert_close(nn.functional.cross_entropy(logits, targets),
                               nn.functional.binary_cross_entropy_with_logits(z, targets.float()))


def test_more_classes_get_a_softmax_layer_and_any_input_size_works():
    model = create_model("jabeena_cnn", num_classes=4, dropout=0.2, batch_norm=True).eval()
    for size in (48, 96, 130):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 4)


def test_grad_cam_explains_both_classes_of_the_sigmoid_output():
    torch.manual_seed(1)
    model = create_model("jabeena_cnn", num_classes=2)
    x = torch.randn(1, 3, 64, 64)
    for index in (0, 1):
        heat = grad_cam(model, x, class_index=index)
        assert heat.shape == (1, 64, 64)
    # [-z/2, z/2]: the gradient for class 0 is minus that for class 1, so the maps differ.
    assert (grad_cam(model, x, 0) != grad_cam(model, x, 1)).any()


def test_edge_maps_find_a_step_and_ignore_flat_images():
    flat = torch.full((2, 3, 16, 16), 120, dtype=torch.uint8)
    assert edge_maps(flat).eq(0).all()
    step = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    step[..., 8:] = 200
    edges = edge_maps(step)
    assert edges.dtype == torch.uint8 and edges.shape == step.shape
    assert edges[0, 0, :, 7:9].eq(255).all()  # strongest response on the step
    assert edges[0, 0, :, :5].eq(0).all() and torch.equal(edges[0, 0], edges[0, 2])
    with pytest.raises(ValueError, match="uint8"):
        edge_maps(step.float())


def test_edge_copies_double_the_training_set_with_the_same_labels():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    doubled, targets = with_edge_copies(images, [0, 1, 1])
    assert doubled.shape == (6, 3, 8, 8) and targets == [0, 1, 1, 0, 1, 1]
    assert torch.equal(doubled[:3], images)


def test_system_c_config_is_a_75_25_split_with_rotations_and_edge_copies():
    config = load_config(REPO / "configs" / "system_c_jabeena.yaml")
    assert config.data.ratios == [0.75, 0.25]
    assert config.model.name == "jabeena_cnn"
    assert config.train.augmentation == "jabeena" and config.train.edge_copies is True
    assert config.features.families == ["histogram", "dft"]
    assert len(set(config.data.class_map.values()) | {"Benign"}) == 2  # a two-class task


def test_trains_on_a_two_class_task_with_edge_copies_and_a_75_25_split(synthetic_root: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    import leukoscope.edges

    seen = []

    def spy(images, targets):
        seen.append(len(targets))
        return with_edge_copies(images, targets)

    monkeypatch.setattr(leukoscope.edges, "with_edge_copies", spy)
    config = load_config(REPO / "configs" / "system_c_jabeena.yaml", [
        f"data.path={synthetic_root}", "model.image_size=32", "train.epochs=1", f"output_root={tmp_path}",
        "train.batch_size=16",
    ])
    config.data.class_map = {"lymphocyte": "normal", "monocyte": "normal", "neutrophil": "normal"}
    result = run_experiment(config, show_progress=False)
    assert result.metrics["evaluated_on"] == "test"
    assert result.metrics["classes"] == ["blast", "normal"]
    sizes = result.metrics["split_sizes"]
    assert sum(sizes.values()) == 96 and sizes.get("val", 0) == 0
    assert sizes["test"] == pytest.approx(24, abs=4)  # 75/25
    assert (result.bundle_dir / "model.safetensors").is_file()
    assert seen == [sizes["train"]]  # the training split (only) got its edge copies
