"""Grad-CAM: known-answer models, hook/mode hygiene, every registry model, overlays."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from leukoscope.inference.explain import (
    GradCamMaps,
    find_target_layer,
    grad_cam,
    grad_cam_maps,
    heatmap_figure,
    heatmap_mask_fraction,
    overlay_heatmap,
)
from leukoscope.models import create_model, list_models


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # Tiny tensors: a second thread only adds sync overhead (30x slower on a busy 2-core box).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------ a model with a known answer


class ColourEvidenceNet(nn.Module):
    """Class 0 = "there is red", class 1 = "there is green"; nothing else counts.

    conv1 (1x1) computes R-G-B and G-R-B, in-place ReLU keeps the evidence,
    max-pool halves the resolution, conv2 is an identity 1x1 conv (the Grad-CAM
    target, at 16x16 for a 32 px input), the head averages each channel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 1)
        self.relu = nn.ReLU(inplace=True)  # in-place after a conv: breaks naive backward hooks
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm1d(2)
        self.dropout = nn.Dropout(0.9)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1]]).view(2, 3, 1, 1))
            self.conv1.bias.zero_()
            self.conv2.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.conv2.bias.zero_()
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv2(self.pool(self.relu(self.conv1(x))))
        return self.head(self.dropout(self.bn(features.mean(dim=(2, 3)))))


def _red_green_image(red_side: int = 8, green_side: int = 8) -> torch.Tensor:
    """Grey 32x32 with a red square in the top-left and a green one in the bottom-right."""
    image = torch.full((3, 32, 32), 0.3)
    image[:, 4 : 4 + red_side, 4 : 4 + red_side] = torch.tensor([1.0, 0, 0])[:, None, None]
    image[:, 20 : 20 + green_side, 20 : 20 + green_side] = torch.tensor([0, 1.0, 0])[:, None, None]
    return image


def _quadrant_share(heatmap: np.ndarray, top: bool, left: bool) -> float:
    h, w = heatmap.shape
    rows = slice(0, h // 2) if top else slice(h // 2, h)
    cols = slice(0, w // 2) if left else slice(w // 2, w)
    return float(heatmap[rows, cols].sum() / heatmap.sum())


def _no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def test_heatmap_follows_the_evidence_of_the_requested_class() -> None:
    model = ColourEvidenceNet()
    batch = torch.stack([_red_green_image(), _red_green_image()])
    maps = grad_cam(model, batch, class_index=[0, 1])
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert _quadrant_share(maps[0], top=True, left=True) > 0.9  # red evidence
    assert _quadrant_share(maps[1], top=False, left=False) > 0.9  # green evidence
    peak = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert 4 <= peak[0] < 12 and 4 <= peak[1] < 12


def test_none_explains_the_predicted_class() -> None:
    model = ColourEvidenceNet()
    # More red than green: predicted class 0, so the map must light up the red square.
    image = _red_green_image(red_side=10, green_side=4)[None]
    assert model.eval()(image).argmax().item() == 0
    heatmap = grad_cam(model, image)[0]
    assert _quadrant_share(heatmap, top=True, left=True) > 0.9
    np.testing.assert_allclose(heatmap, grad_cam(model, image, class_index=0)[0])


def test_single_image_without_batch_dimension() -> None:
    assert grad_cam(ColourEvidenceNet(), _red_green_image(), class_index=1).shape == (1, 32, 32)


def test_trained_cnn_looks_at_the_blob_that_defines_the_class() -> None:
    """End to end: a small CNN learns "bright blob present"; Grad-CAM must find the blob."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        images = rng.normal(0.0, 0.3, (n, 3, 32, 32)).astype(np.float32)
        labels = rng.integers(0, 2, n)
        blobs = np.zeros((n, 32, 32), dtype=bool)
        for i in np.flatnonzero(labels):
            r, c = rng.integers(2, 24, 2)
            blobs[i, r : r + 6, c : c + 6] = True
            images[i, :, r : r + 6, c : c + 6] += 2.0
        return torch.from_numpy(images), torch.from_numpy(labels), blobs

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        images, labels, _ = batch(32)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    images, labels, blobs = batch(64)
    positives = labels.numpy() == 1
    assert (model(images).argmax(1) == labels).float().mean() > 0.9
    maps = grad_cam(model, images[positives], class_index=1)
    # Two 3x3 convs see 2 px around each pixel: the map cannot be sharper than
    # the blob grown by 2 px (10 x 10 = ~10 % of the image).
    near_blob = [ndimage.binary_dilation(b, iterations=2) for b in blobs[positives]]
    shares = [heatmap_mask_fraction(h, m) for h, m in zip(maps, near_blob)]
    assert min(shares) > 0.9


# ------------------------------------------------------------ hygiene: hooks, modes, gradients


def test_hooks_removed_modes_restored_and_parameter_grads_untouched() -> None:
    model = ColourEvidenceNet()
    model.train()
    model.bn.eval()  # mixed modes must come back exactly as they were
    before = {name: m.training for name, m in model.named_modules()}
    image = _red_green_image()[None]
    first = grad_cam(model, image, class_index=0)
    # Dropout(0.9) would make two train-mode runs differ: Grad-CAM runs in eval mode.
    np.testing.assert_array_equal(first, grad_cam(model, image, class_index=0))
    assert {name: m.training for name, m in model.named_modules()} == before
    assert _no_hooks_left(model)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "call",
    [
        lambda model: grad_cam(model, _red_green_image()[None], class_index=7),  # after the forward
        lambda model: grad_cam(model, torch.zeros(1, 4, 32, 32)),  # inside the forward
        lambda model: grad_cam(model, _red_green_image()[None].repeat(2, 1, 1, 1), class_index=[0]),
    ],
)
def test_hooks_and_modes_are_restored_on_error(call) -> None:
    model = ColourEvidenceNet().train()
    with pytest.raises((ValueError, RuntimeError)):
        call(model)
    assert _no_hooks_left(model)
    assert all(m.training for m in model.modules())


def test_frozen_parameters_and_gradient_free_contexts() -> None:
    model = ColourEvidenceNet()
    for parameter in model.parameters():
        parameter.requires_grad = False
    image = _red_green_image()[None]
    with torch.no_grad():
        in_no_grad = grad_cam(model, image, class_index=0)
    with torch.inference_mode():
        in_inference = grad_cam(model, image, class_index=0)
    assert _quadrant_share(in_no_grad[0], top=True, left=True) > 0.9
    np.testing.assert_allclose(in_inference, in_no_grad)
    assert not any(p.requires_grad for p in model.parameters())


def test_frozen_backbone_gives_the_same_map_as_trainable() -> None:
    # Freezing changes which tensors need gradients, never the explanation.
    model = _fast_random_model("resnet18", freeze_backbone=True)
    assert not any(p.requires_grad for p in model.layer4.parameters())
    inputs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    frozen = grad_cam(model, inputs, class_index=[0, 2])
    for parameter in model.parameters():
        parameter.requires_grad = True
    np.testing.assert_allclose(frozen, grad_cam(model, inputs, class_index=[0, 2]), atol=1e-6)
    assert frozen.any()
    assert all(p.grad is None for p in model.parameters())


def test_invalid_inputs_are_rejected() -> None:
    model = ColourEvidenceNet()
    with pytest.raises(ValueError, match="N, C, H, W"):
        grad_cam(model, torch.zeros(32, 32))
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, _red_green_image()[None], class_index=-1)
    with pytest.raises(ValueError, match="did not run"):
        grad_cam(model, _red_green_image()[None], target_layer=nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="no Conv2d"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


# ------------------------------------------------------------ target layer discovery


class SqueezeExciteNet(nn.Module):
    """Registered in reverse order of use, and with an SE conv on a 1x1 map last."""

    def __init__(self) -> None:
        super().__init__()
        self.se = nn.Conv2d(4, 4, 1)  # runs last, on a pooled 1x1 map
        self.late = nn.Conv2d(4, 4, 3, padding=1)
        self.early = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.late(torch.relu(self.early(x)))
        gate = torch.sigmoid(self.se(features.mean(dim=(2, 3), keepdim=True)))
        return self.head((features * gate).mean(dim=(2, 3)))


def test_target_is_last_executed_spatial_conv() -> None:
    model = SqueezeExciteNet()
    assert find_target_layer(model, input_size=16) is model.late
    assert _no_hooks_left(model)
    inputs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(grad_cam(model, inputs), grad_cam(model, inputs, target_layer=model.late))


class TwoBranchNet(nn.Module):
    """A DenseNet/GoogLeNet-like last stage: two branches concatenated, and a head that reads only the
    first. The last conv to run is the second branch's, which carries none of the class evidence."""

    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.read, self.ignored = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.read(x), self.ignored(x)], dim=1)

    def __init__(self) -> None:
        super().__init__()
        self.stage = self.Stage()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight[:, 2:] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(x).mean(dim=(2, 3)))


def test_the_default_target_is_the_whole_last_stage_not_its_last_branch() -> None:
    """The last Conv2d executed was the default: for DenseNet (32 of 1024 channels), GoogLeNet (one branch of
    four) and ResNet (no skip path) it explained part of what the head reads; here, nothing of it (flat)."""
    torch.manual_seed(0)
    model = TwoBranchNet().eval()
    assert find_target_layer(model, input_size=16) is model.stage
    inputs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert not grad_cam(model, inputs, class_index=0, target_layer=model.stage.ignored).any()
    maps = grad_cam(model, inputs, class_index=0)
    assert all(heatmap.max() == pytest.approx(1.0) for heatmap in maps)
    np.testing.assert_array_equal(maps, grad_cam(model, inputs, class_index=0, target_layer=model.stage))


def test_matches_the_grad_cam_definition() -> None:
    """Reference: ReLU(sum_c mean_xy(dy/dA_c) * A_c), bilinear to the input, min-max scaled."""
    torch.manual_seed(0)
    # Flatten + Linear head: the gradient varies over space, so averaging it matters.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    ).eval()
    inputs = torch.rand(2, 3, 16, 16)
    captured: list[torch.Tensor] = []
    handle = model[2].register_forward_hook(lambda _m, _i, out: captured.append(out))
    logits = model(inputs)
    handle.remove()
    (gradient,) = torch.autograd.grad(logits[:, 1].sum(), captured[0])
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * captured[0]).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    expected = ((cam - low) / (cam.amax(dim=(1, 2), keepdim=True) - low)).detach().numpy()
    assert find_target_layer(model, 16) is model[2]
    np.testing.assert_allclose(grad_cam(model, inputs, class_index=1), expected, atol=1e-5)


def _fast_random_model(name: str, **kwargs) -> nn.Module:
    """``create_model(name, 3, **kwargs)`` with cheap random weights.

    Built on the meta device then filled: torchvision's own init of VGG's 120 M
    head weights takes seconds, and only the wiring matters for these tests.
    """
    with torch.device("meta"):
        model = create_model(name, num_classes=3, **kwargs)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            with torch.no_grad():
                _fill(tensor, key, is_norm, generator)
    return model


def _fill(tensor: torch.Tensor, key: str, is_norm: bool, generator: torch.Generator) -> None:
    if key == "running_var" or (is_norm and key == "weight"):
        tensor.fill_(1.0)
    elif key in ("running_mean", "bias", "num_batches_tracked") or tensor.dim() < 2:
        tensor.zero_()
    else:
        rows, cols = tensor.shape[0], tensor[0].numel()
        scale = (2.0 / cols) ** 0.5  # He init: activations keep their size through the net
        if tensor.numel() <= 1_000_000:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
        else:  # VGG/AlexNet heads: a rank-1 random matrix, one pass over memory
            left, right = torch.randn(rows, 1, generator=generator), torch.randn(1, cols, generator=generator)
            torch.mul(left * scale, right, out=tensor.view(rows, cols))


def test_inplace_relu_after_the_target_explains_the_relu_output() -> None:
    model = _fast_random_model("tusar_convnet")  # Conv2d -> ReLU(inplace=True) throughout
    inputs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = grad_cam(model, inputs, class_index=[0, 1])
    # the default: the last conv, as its stage ends in max-pooling (a stage's output would halve the map)
    assert find_target_layer(model, 64) is model.features[8]
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    np.testing.assert_allclose(maps, grad_cam(model, inputs, [0, 1], target_layer=model.features[9]), atol=1e-6)
    assert maps.any()


def test_the_default_target_keeps_the_last_conv_s_resolution() -> None:
    """The whole-stage default took VGG's and the seed CNNs' `features` after their final max-pool: maps at
    half the resolution (vgg19 at 224 px: 7x7 instead of 14x14)."""
    for name, size in (("vgg19", 64), ("abas_cnn", 64), ("resnet18", 64), ("densenet121", 64)):
        model = _fast_random_model(name)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        seen: dict[nn.Module, tuple[int, ...]] = {}
        hooks = [m.register_forward_hook(lambda m, _i, out: seen.__setitem__(m, tuple(out.shape[-2:])))
                 for m in [*convs, find_target_layer(model, size)]]
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
        for hook in hooks:
            hook.remove()
        last_conv = [seen[m] for m in convs if m in seen and seen[m][0] * seen[m][1] > 1][-1]
        assert seen[find_target_layer(model, size)] == last_conv, name


@pytest.mark.parametrize("name", list_models("classifier"))
def test_every_registry_classifier(name: str) -> None:
    model = _fast_random_model(name)
    model.train()
    inputs = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    layer = find_target_layer(model, input_size=64)
    assert any(isinstance(inner, nn.Conv2d) for inner in layer.modules())
    maps = grad_cam(model, inputs)
    assert maps.shape == (2, 64, 80) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    for heatmap in maps:  # each map is either rescaled to [0, 1] or all zero
        assert heatmap.max() == pytest.approx(1.0) or not heatmap.any()
    assert model.training and _no_hooks_left(model)


def test_one_batch_gives_the_maps_of_one_image_at_a_time() -> None:
    """A batch with one class per image is what the per-image calls give (eval-mode batch norm
    keeps images independent): what makes batched Grad-CAM in `predict --explain` safe."""
    model = _fast_random_model("mobilenet_v2")
    inputs = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    classes = [0, 2, 1, 1, 0]
    batched = grad_cam(model, inputs, classes)
    single = np.concatenate([grad_cam(model, inputs[i:i + 1], classes[i]) for i in range(len(inputs))])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert batched.any(axis=(1, 2)).sum() >= 3  # real maps, not all-zero ones that agree trivially
    assert not np.allclose(batched[0], batched[1])


def test_save_explanations_runs_grad_cam_once_per_batch(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from leukoscope.bundle import BundleInfo
    from leukoscope.inference import explain
    from leukoscope.inference.predict_files import save_explanations
    from leukoscope.inference.predictor import CellClassifier
    from leukoscope.preprocessing import Preprocessing

    model = _fast_random_model("mobilenet_v2")
    info = BundleInfo(model_name="mobilenet_v2", classes=["a", "b", "c"], preprocessing=Preprocessing(image_size=48))
    classifier = CellClassifier(model, info)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"cell{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)).save(paths[-1])
    predictions = classifier.predict_paths(paths)
    calls: list[tuple[int, list[int]]] = []
    maps: list[np.ndarray] = []

    def counting(model_, inputs, index, views=1) -> GradCamMaps:
        calls.append((len(inputs), list(index)))
        found = grad_cam_maps(model_, inputs, index, views=views)
        maps.append(found.heatmaps)
        return found

    monkeypatch.setattr(explain, "grad_cam_maps", counting)
    written = save_explanations(classifier, predictions, tmp_path / "cam", batch_size=2)
    assert len(written) == 5 and [n for n, _ in calls] == [2, 2, 1]  # 3 passes for 5 images, not 5
    wanted = [classifier.classes.index(p.top_class) for p in predictions]
    assert [i for _, index in calls for i in index] == wanted  # each image explains its own top class
    for i, path in enumerate(paths):  # each map is the one Grad-CAM gives that image alone
        image = classifier.preprocess(Image.open(path).convert("RGB"))[None]
        alone = grad_cam_maps(model, image, wanted[i]).heatmaps[0]
        np.testing.assert_allclose(np.concatenate(maps)[i], alone, atol=1e-5)


# ------------------------------------------------------------ overlay and mask fraction


def test_overlay_blends_the_colormap_over_the_image() -> None:
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    heatmap = np.zeros((10, 20), np.float32)
    heatmap[:, 10:] = 1.0  # right half hot; half the image's resolution
    out = overlay_heatmap(image, heatmap, alpha=1.0, colormap="jet")
    assert out.size == (40, 20) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    assert pixels[10, 35, 0] > 100 and pixels[10, 35, 2] < 50  # jet(1) is dark red
    assert pixels[10, 5, 2] > 100 and pixels[10, 5, 0] < 50  # jet(0) is dark blue
    np.testing.assert_array_equal(np.asarray(overlay_heatmap(image, heatmap, alpha=0.0)), np.asarray(image))
    half = np.asarray(overlay_heatmap(image, heatmap, alpha=0.5)).astype(int)
    np.testing.assert_allclose(half, (pixels + np.asarray(image)) / 2, atol=1)


def test_heatmap_figure_has_a_colour_bar_from_lowest_to_high() -> None:
    image = Image.new("RGB", (256, 256), (200, 200, 200))
    heatmap = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    figure = heatmap_figure(overlay_heatmap(image, heatmap), heatmap, "blast", flat=False)
    width, height = figure.size
    assert width > 256 + 40 and height > 256  # room for the bar and the caption
    pixels = np.asarray(figure).astype(int)
    bar = pixels[20:240, 256:width]
    # the bar's column: jet from dark red (1, "high", top) down to dark blue (0, "lowest", bottom)
    column = next(x for x in range(bar.shape[1]) if bar[5, x, 0] > 100 and bar[5, x, 2] < 60)
    assert bar[-5, column, 2] > 100 and bar[-5, column, 0] < 60
    np.testing.assert_array_equal(pixels[:256, :256], np.asarray(overlay_heatmap(image, heatmap)))


def test_a_flat_map_is_saved_with_a_visible_note() -> None:
    image = Image.new("RGB", (256, 256), (200, 200, 200))
    # a flat map scaled for display: its ripple stretched to the full range, as grad_cam gives it
    stretched = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    overlay = overlay_heatmap(image, stretched)
    plain = np.asarray(overlay).astype(int)
    noted = np.asarray(heatmap_figure(overlay, stretched, "blast", flat=True)).astype(int)[:256, :256]
    changed = np.abs(noted - plain).sum(axis=2) > 60
    assert changed[100:156, :].sum() > 500  # the note is drawn across the middle of the picture
    assert not changed[:60].any() and not changed[-60:].any()
    bare = np.asarray(heatmap_figure(overlay, stretched, "blast", flat=False)).astype(int)[:256, :256]
    np.testing.assert_array_equal(bare, plain)


def test_the_figure_carries_the_prediction_s_status_and_notes() -> None:
    """The picture said only "Grad-CAM evidence for 'platelet'" for a row the predictions file called uncertain
    and unfamiliar, with a warning; the coarse-map caveat was on the console only."""
    image = Image.new("RGB", (256, 256), (200, 200, 200))
    heatmap = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    overlay = overlay_heatmap(image, heatmap)
    plain = heatmap_figure(overlay, heatmap, "platelet", flat=False)
    status = "! uncertain (top: platelet 0.42), unfamiliar"
    noted = heatmap_figure(overlay, heatmap, "platelet", flat=False, status=status, alert=True,
                           notes=["warning: No scale for a single-cell image (warnings column)", "x " * 200])
    assert noted.width == plain.width and noted.height >= plain.height + 15 * 7  # status, 1 + 5 wrapped notes
    first = np.asarray(noted).astype(int)[256:272, :]
    red = (first[..., 0] > 180) & (first[..., 1] < 90) & (first[..., 2] < 90)
    assert red.sum() > 50  # the status line, in red
    calm = np.asarray(heatmap_figure(overlay, heatmap, "x", flat=False, status="lymphocyte 0.99")).astype(int)
    first = calm[256:272, :]
    assert not ((first[..., 0] > 180) & (first[..., 1] < 90)).any() and calm.shape[0] == plain.height + 15


def test_save_explanations_pictures_say_what_the_row_says(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Named and captioned by the label (not the top class of an uncertain row), unfamiliar marked, warnings
    and the coarse-map caveat on the picture."""
    from dataclasses import replace

    from leukoscope.bundle import BundleInfo
    from leukoscope.inference import explain
    from leukoscope.inference.predict_files import save_explanations
    from leukoscope.inference.predictor import CellClassifier
    from leukoscope.preprocessing import Preprocessing

    info = BundleInfo(model_name="mobilenet_v2", classes=["a", "b", "c"], preprocessing=Preprocessing(image_size=48))
    classifier = CellClassifier(_fast_random_model("mobilenet_v2"), info, uncertain_threshold=1.0)
    path = tmp_path / "cell.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    (prediction,) = classifier.predict_paths([path])
    prediction = replace(prediction, unfamiliar=True, ood_score=9.0,
                         warnings=("No scale for a single-cell image: classified whole, although ...",))
    drawn: list[dict] = []
    real = explain.heatmap_figure

    def recording(*args, **kwargs) -> Image.Image:
        drawn.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(explain, "heatmap_figure", recording)
    (written,) = save_explanations(classifier, [prediction], tmp_path / "cam")
    assert prediction.label == "uncertain" and written.name == "00000_cell_uncertain.png"
    (kwargs,) = drawn
    top = f"{prediction.top_class} {prediction.confidence:.2f}"
    assert kwargs["status"] == f"! uncertain (top: {top}), unfamiliar" and kwargs["alert"]
    assert kwargs["notes"][0] == "warning: No scale for a single-cell image (warnings column)"
    assert kwargs["notes"][1] == explain.coarse_map_warning(classifier.model, 48)  # 2 x 2 at 48 px
    assert Image.open(written).height > 256 + 15 * 6


class NearlyConstantNet(nn.Module):
    """A collapsed model: its one feature map is ``level`` everywhere plus ``ripple`` x the red channel, and its
    logits barely depend on the image (a training run that learned nothing gave maps varying by 0.7%)."""

    def __init__(self, level: float, ripple: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([ripple, 0.0, 0.0]).view(1, 3, 1, 1))
            self.conv.bias.fill_(level)
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_flatness_is_judged_on_the_raw_map_not_the_scaled_one() -> None:
    """The check ran on the map after min-max scaling, so a collapsed model's maps (raw max - min 0.7% of their
    level, the same wash on every cell) were drawn full-range without FLAT MAP."""
    image = _red_green_image()
    collapsed = grad_cam_maps(NearlyConstantNet(level=1.0, ripple=0.005), image, 0)
    assert collapsed.heatmaps.max() == pytest.approx(1.0) and collapsed.heatmaps.min() == 0.0  # stretched
    assert collapsed.flat.tolist() == [True] and collapsed.contrast[0] < 0.01
    pointed = grad_cam_maps(NearlyConstantNet(level=0.0, ripple=1.0), image, 0)  # red only where red is
    assert pointed.flat.tolist() == [False] and pointed.contrast[0] == pytest.approx(1.0)
    np.testing.assert_allclose(pointed.heatmaps, collapsed.heatmaps, atol=1e-3)  # the same picture: only the
    # raw map tells them apart
    # scale-free: a tiny map that points somewhere (a random-init net's ~1e-13) is not flat
    assert not grad_cam_maps(NearlyConstantNet(level=0.0, ripple=1e-12), image, 0).flat[0]
    nothing = grad_cam_maps(NearlyConstantNet(level=0.0, ripple=1.0), image, 1)  # no positive evidence
    assert nothing.flat[0] and not nothing.heatmaps.any()
    # test-time views: judged on the views' raw maps averaged, not on each view's scaled map
    views = grad_cam_maps(NearlyConstantNet(level=1.0, ripple=0.005), image, 0, views=8)
    assert views.flat[0] and views.heatmaps.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(grad_cam(NearlyConstantNet(level=1.0, ripple=0.005), image, 0),
                                  collapsed.heatmaps)


def test_a_level_map_with_a_few_zero_pixels_is_still_flat() -> None:
    """Grad-CAM clips its map at 0: with (max - min) / max, one pixel at 0 made a collapsed model's level map
    read as fully contrasted (1.0), and it was drawn full-range without FLAT MAP."""
    from leukoscope.inference.explain import map_contrast

    level = torch.full((1, 32, 32), 1.0) + 0.005 * torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    speck = level.clone()
    speck[0, 0, 0] = 0.0
    blob = torch.zeros(1, 32, 32)
    blob[0, 8:20, 8:20] = 1.0  # evidence in one region, none elsewhere
    contrast = map_contrast(torch.cat([level, speck, blob])).tolist()
    assert contrast[0] < 0.01 and contrast[1] < 0.01 and contrast[2] == pytest.approx(1.0)
    assert map_contrast(torch.zeros(1, 4, 4)).tolist() == [0.0]


def test_overlay_rejects_bad_arguments() -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, np.zeros((8, 8)), alpha=1.5)
    with pytest.raises(ValueError, match="normalise"):
        overlay_heatmap(image, np.full((8, 8), 3.0))
    with pytest.raises(ValueError, match="colormap"):
        overlay_heatmap(image, np.zeros((8, 8)), colormap="no-such-map")


def test_heatmap_mask_fraction_by_hand() -> None:
    heatmap = np.array([[1.0, 0.0], [0.0, 3.0]])
    assert heatmap_mask_fraction(heatmap, np.array([[True, False], [False, False]])) == pytest.approx(0.25)
    assert heatmap_mask_fraction(heatmap, np.array([[False, True], [True, True]])) == pytest.approx(0.75)
    assert heatmap_mask_fraction(heatmap, np.ones((2, 2), bool)) == pytest.approx(1.0)
    assert heatmap_mask_fraction(np.full((4, 4), 0.2), np.eye(4, dtype=bool)) == pytest.approx(0.25)
    assert np.isnan(heatmap_mask_fraction(np.zeros((2, 2)), np.ones((2, 2), bool)))
    with pytest.raises(ValueError, match="shape"):
        heatmap_mask_fraction(heatmap, np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="non-negative"):
        heatmap_mask_fraction(-heatmap, np.ones((2, 2), bool))


def test_a_map_coarser_than_six_a_side_is_said_to_show_the_crop_not_the_cell() -> None:
    """The shipped classifier (mobilenet_v2 at 96 px) reads a 3 x 3 stage: its maps of unrelated cells looked
    alike, and nothing said so."""
    from leukoscope.inference.explain import coarse_map_warning, target_map_size

    model = _fast_random_model("mobilenet_v2")
    assert target_map_size(model, 96) == (3, 3) and target_map_size(model, 224) == (7, 7)
    assert "last stage at 3 x 3 for its 96 px input" in coarse_map_warning(model, 96)
    assert coarse_map_warning(model, 224) is None
