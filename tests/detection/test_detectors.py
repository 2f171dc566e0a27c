from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leukoscope.models import WeightsError, create_model, list_models
from leukoscope.models.detectors import FixedScaleTransform, create_detector

DETECTORS = ["fasterrcnn_abas", "fasterrcnn_mobilenet_v3_fpn", "fasterrcnn_resnet50_fpn", "fcos_resnet50_fpn"]


def test_registry_lists_detectors() -> None:
    assert set(DETECTORS) <= set(list_models("detector"))
    assert not set(DETECTORS) & set(list_models("classifier"))


@pytest.mark.parametrize("name", DETECTORS)
def test_builds_and_runs_in_train_and_eval_mode(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, input_scale=0.5)
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 112)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for output, image in zip(outputs, images):
        boxes = output["boxes"]
        assert boxes.shape[1] == 4
        if len(boxes):  # boxes are returned in the input image's own pixels
            assert boxes[:, 2].max() <= image.shape[-1] + 1e-3 and boxes[:, 3].max() <= image.shape[-2] + 1e-3
            assert output["labels"].min() >= 1 and output["labels"].max() <= 3


def test_fixed_scale_transform_scales_images_and_boxes() -> None:
    transform = FixedScaleTransform(0.5).eval()
    images, targets = transform([torch.rand(3, 120, 160)], [{"boxes": torch.tensor([[20.0, 10.0, 100.0, 90.0]]),
                                                              "labels": torch.tensor([1])}])
    assert images.image_sizes[0] == (60, 80)
    assert targets[0]["boxes"].tolist() == [[10.0, 5.0, 50.0, 45.0]]
    uint8 = (torch.rand(3, 120, 160) * 255).to(torch.uint8)  # uint8 is scaled to [0, 1] first
    assert torch.allclose(transform([uint8])[0].tensors, transform([uint8.float() / 255])[0].tensors)
    with pytest.raises(TypeError, match="float images in \\[0, 1\\] or uint8 images, not torch.int64"):
        transform([uint8.long()])


def test_detector_needs_a_class_and_classifier_names_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        create_model("fasterrcnn_abas", num_classes=0)
    with pytest.raises(ValueError, match="not a detector"):
        create_detector("abas_cnn", num_classes=2)
    assert create_detector("fasterrcnn_abas", num_classes=1) is not None  # WBC-only detector


def test_abas_backbone_from_classifier_bundle(tmp_path: Path) -> None:
    from leukoscope.bundle import BundleInfo, save_bundle
    from leukoscope.preprocessing import Preprocessing

    torch.manual_seed(1)
    classifier = create_model("abas_cnn", num_classes=2)
    bundle = save_bundle(tmp_path / "bundle", classifier, BundleInfo("abas_cnn", ["a", "b"],
                                                                      Preprocessing(64, [0.5] * 3, [0.2] * 3)))
    for source in (bundle, bundle / "model.safetensors"):
        detector = create_model("fasterrcnn_abas", num_classes=3, backbone_weights=source)
        assert torch.equal(detector.backbone.features[0].weight, classifier.features[0].weight)
        assert torch.equal(detector.backbone.features[1].running_var, classifier.features[1].running_var)
    frozen = create_model("fasterrcnn_abas", num_classes=3, backbone_weights=bundle, freeze_backbone=True)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert any(p.requires_grad for p in frozen.roi_heads.parameters())
    other = create_model("tusar_convnet", num_classes=2)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsError):
        create_model("fasterrcnn_abas", num_classes=3, backbone_weights=tmp_path / "other.pt")


def test_a_narrow_box_head_is_smaller_rebuilt_from_its_bundle_and_leaves_the_default_alone(tmp_path: Path) -> None:
    from leukoscope.bundle import BundleInfo, load_bundle, save_bundle

    def build(**options):
        torch.manual_seed(0)
        return create_model("fasterrcnn_mobilenet_v3_fpn", num_classes=3, **options)

    narrow, default = build(representation_size=256), build()
    assert narrow.roi_heads.box_head.fc7.out_features == 256
    assert narrow.roi_heads.box_predictor.cls_score.in_features == 256
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in default.parameters()) - 4_000_000
    # the default draws its random weights as before the option existed
    assert all(torch.equal(a, b) for a, b in zip(build(representation_size=1024).state_dict().values(),
                                                 default.state_dict().values()))
    bundle = save_bundle(tmp_path / "b", narrow, BundleInfo("fasterrcnn_mobilenet_v3_fpn", ["a", "b", "c"],
                                                            task="detect", model_options={"representation_size": 256}))
    loaded, _ = load_bundle(bundle)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), narrow.state_dict().values()))


@pytest.mark.parametrize("name", ["fasterrcnn_abas", "fasterrcnn_mobilenet_v3_fpn", "fasterrcnn_resnet50_fpn"])
def test_roi_sampling_ratio_sets_the_box_pooling_and_nothing_else(name: str) -> None:
    def build(**options):
        torch.manual_seed(0)
        return create_model(name, num_classes=3, input_scale=0.5, **options).eval()

    default, one = build(), build(roi_sampling_ratio=1)
    assert default.roi_heads.box_roi_pool.sampling_ratio == 2 and one.roi_heads.box_roi_pool.sampling_ratio == 1
    assert default.roi_heads.box_roi_pool.featmap_names == one.roi_heads.box_roi_pool.featmap_names
    # the same weights: the option changes how boxes are pooled, not the model
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), one.state_dict().values()))
    with pytest.raises(ValueError, match="roi_sampling_ratio"):
        build(roi_sampling_ratio=-1)


def test_one_sample_per_bin_pools_a_different_average_of_the_same_map() -> None:
    pools = {ratio: create_model("fasterrcnn_abas", num_classes=3, roi_sampling_ratio=ratio).roi_heads.box_roi_pool
             for ratio in (1, 2)}
    features = {"0": torch.rand(1, 8, 40, 40)}
    boxes, sizes = [torch.tensor([[0.0, 0.0, 300.0, 300.0]])], [(640, 640)]
    one, two = (pools[ratio](features, boxes, sizes) for ratio in (1, 2))
    assert one.shape == two.shape == (1, 8, 7, 7) and not torch.allclose(one, two)
    assert abs(float(one.mean() - two.mean())) < 0.05  # both average the same map


def test_an_images_detections_do_not_depend_on_what_it_is_batched_with(detector_bundle: Path) -> None:
    """The per-image caps scale with the image's area; a 640x480 field batched with a 1280x960 one got the
    larger one's caps (the untrained test detector keeps every box: 12 alone, 48 beside the large one)."""
    import numpy as np

    from leukoscope.inference.detector import CellDetector, same_size_batches

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (960, 1280, 3), dtype=np.uint8)
    detector = CellDetector.from_bundle(detector_bundle)
    alone = detector.detect([small])[0]
    beside = detector.detect([small, large], batch_size=2)[0]
    assert len(alone.boxes) == len(beside.boxes) and np.allclose(alone.boxes, beside.boxes)
    assert [len(b) for b in same_size_batches([small, small, large, small, small, small], 2)] == [2, 1, 2, 1]


def test_a_detectors_settings_are_named_by_their_own_keys_and_a_frozen_random_backbone_refused(tmp_path: Path) -> None:
    """A wrong backbone file was reported as "model.options for fasterrcnn_abas: ..."; a frozen backbone without
    weights trained the heads on a random one, without a word."""
    from leukoscope.engine.config import ConfigError
    from leukoscope.engine.detection_config import load_detection_config
    from leukoscope.tasks.detect import build_detector

    torch.save(create_model("tusar_convnet", num_classes=2).state_dict(), tmp_path / "other.pt")
    config = load_detection_config(overrides=["model.name=fasterrcnn_abas",
                                              f"model.backbone_weights={tmp_path / 'other.pt'}"])
    with pytest.raises(ConfigError, match=r"^fasterrcnn_abas with model.backbone_weights: .*no backbone weights"):
        build_detector(config, 3)
    config = load_detection_config(overrides=["model.name=fasterrcnn_abas", "model.freeze_backbone=true"])
    random = "without model.backbone_weights, model.weights or model.init they are random"
    with pytest.raises(ConfigError, match=random):
        build_detector(config, 3)
    # refused by the run before it makes its folder or reads an image
    from leukoscope.tasks.detect import run_detection_experiment

    config = load_detection_config(overrides=["model.name=fasterrcnn_abas", "model.freeze_backbone=true",
                                              f"data.path={tmp_path / 'nowhere'}", f"output_root={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=random):
        run_detection_experiment(config, show_progress=False)
    assert not (tmp_path / "runs").exists()
