"""The model registry, the seed-paper CNNs and weight loading from local files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from leukoscope.models import WeightsError, create_model, list_models, model_entry
from leukoscope.models.registry import wrong_option_type

PUBLISHED = ["abas_cnn", "tusar_convnet", "mobilenet_v2", "resnet18", "resnet50", "vgg16", "vgg19",
             "densenet121", "efficientnet_b0", "googlenet", "alexnet"]


def test_every_published_architecture_is_registered() -> None:
    names = list_models()
    assert set(PUBLISHED) <= set(names)
    assert set(PUBLISHED) <= set(list_models(kind="classifier"))
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        model_entry("resnet19")


@pytest.mark.parametrize("name", ["abas_cnn", "tusar_convnet", "mobilenet_v2", "resnet18", "efficientnet_b0"])
def test_new_head_has_num_classes_outputs(name: str) -> None:
    model = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_seed_cnns_match_their_papers() -> None:
    # System D: 5.6 M parameters at 224 px; system A: conv32-64-128-128 then FC 150-60-classes.
    assert sum(p.numel() for p in create_model("tusar_convnet", 4).parameters()) == pytest.approx(5.6e6, rel=0.01)
    abas = create_model("abas_cnn", 2)
    convs = [m.out_channels for m in abas.features if isinstance(m, torch.nn.Conv2d)]
    linears = [m.out_features for m in abas.classifier if isinstance(m, torch.nn.Linear)]
    assert convs == [32, 64, 128, 128] and linears == [150, 60, 2]
    assert abas.features(torch.randn(1, 3, 256, 256)).shape == (1, 128, 16, 16)


def test_too_few_classes_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        create_model("resnet18", 1)


def test_frozen_backbone_trains_only_the_head() -> None:
    model = create_model("resnet18", 4, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    seed = create_model("tusar_convnet", 4, freeze_backbone=True)
    assert not any(p.requires_grad for p in seed.features.parameters())
    assert all(p.requires_grad for p in seed.classifier.parameters())


def test_local_imagenet_file_loads_backbone_and_skips_the_1000_class_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(weights=None)  # stands in for a downloaded ImageNet file
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    model = create_model("resnet18", 4, weights=path)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert model.fc.out_features == 4


def test_safetensors_file_and_mismatched_files(tmp_path: Path) -> None:
    source = create_model("tusar_convnet", 4)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = create_model("tusar_convnet", 4, weights=tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    with pytest.raises(WeightsError, match="does not fit this architecture"):
        create_model("resnet18", 4, weights=tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("resnet18", 4, weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot read weights"):
        create_model("resnet18", 4, weights=tmp_path / "junk.pth")


def test_torchvision_weight_names_use_torchvisions_downloader_and_cache(tmp_path: Path, monkeypatch) -> None:
    """The online path (weights="IMAGENET1K_V1") served from a local cache file, no network."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), cache / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = create_model("resnet18", 3, weights="IMAGENET1K_V1")
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.fc.out_features == 3
    with pytest.raises(WeightsError, match="neither a file nor a torchvision weight name"):
        create_model("resnet18", 3, weights="IMAGENET_V9")
    # a damaged cached file, and a download that cannot reach the network: clear errors, not tracebacks
    (cache / Path(weights.url).name).write_bytes(b"\0" * 1000)
    with pytest.raises(WeightsError, match="cannot be read .*delete the file"):
        create_model("resnet18", 3, weights="IMAGENET1K_V1")
    (cache / Path(weights.url).name).unlink()
    from urllib.error import URLError

    def offline(*_args, **_kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match="no network.*model.weights=PATH"):
        create_model("resnet18", 3, weights="IMAGENET1K_V1")


def test_group_norm_replaces_every_batchnorm_and_is_refused_where_it_cannot_apply() -> None:
    model = create_model("mobilenet_v2", 3, norm="group")
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert norms and all(isinstance(m, torch.nn.GroupNorm) for m in norms)
    assert all(m.num_channels % m.num_groups == 0 and m.num_groups <= 8 for m in norms)
    # GroupNorm statistics are each image's own: an image's output does not depend on its batch.
    model.train()
    model.classifier[0].eval()  # dropout off; the norm layers stay in training mode
    images = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model(images)[:1], model(images[:1]), atol=1e-5)
    with pytest.raises(ValueError, match="norm 'group' needs an architecture"):
        create_model("vgg19", 3, norm="group")
    with pytest.raises(ValueError, match="weights are for BatchNorm"):
        create_model("resnet18", 3, norm="group", weights="DEFAULT")
    with pytest.raises(ValueError, match="model.options.norm: expected one of 'batch', 'group', got 'layer'"):
        create_model("resnet18", 3, norm="layer")


@pytest.mark.parametrize("value, said", [
    ("ten", "expected a number, got 'ten'"), ([0.1], "expected a number, got [0.1]"),
    (None, "expected a number, got null"), (True, "expected a number, got True"),
    ("1e-3", "expected a number, got '1e-3' (YAML read 1e-3 as text: write it with a dot, e.g. 0.001)")])
def test_an_option_of_the_wrong_type_is_named_with_the_type_it_takes(value, said: str) -> None:
    # {dropout: ten} reached nn.Dropout: "TypeError: '<' not supported between instances of 'str' and 'int'"
    with pytest.raises(ValueError, match=re.escape(f"model.options.dropout: {said}")):
        create_model("abas_cnn", 3, dropout=value)
    assert wrong_option_type("abas_cnn", {"dropout": 1}) is None  # a whole number is a number
    assert wrong_option_type("random_forest", {"max_depth": None, "k_best": "all", "class_weight": None}) is None
    assert wrong_option_type("fasterrcnn_resnet50_fpn", {"scale_jitter": [0.9, 1.1]}) is None
    assert wrong_option_type("fasterrcnn_resnet50_fpn", {"scale_jitter": 0.9}) == (
        "model.options.scale_jitter: expected a list whose items are each a number, got 0.9")
