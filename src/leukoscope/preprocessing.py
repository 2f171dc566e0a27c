"""The one path from an image to a classifier's input, owned by the bundle.

As torchvision's weights carry their transforms, every classifier bundle
carries a :class:`Preprocessing`, and every place that feeds a classifier
(training-time validation and test scoring, ``evaluate``, ``predict``,
``analyze``, the web service, Grad-CAM, any export) goes through it:

1. :meth:`Preprocessing.pixel_array`: PIL RGB -> optional segmentation -> letterbox
   to ``image_size`` -> optional stain normalisation -> uint8 ``(3, S, S)`` (:meth:`Preprocessing.pixels`: the same as a
   torch tensor). Training decodes every image once this way
   (:meth:`Preprocessing.decode`) and augments the uint8 tensors.
2. :meth:`Preprocessing.model_input`: uint8 -> what the model reads: the
   bundle's own mean/std normalisation for a torch model, the uint8 pixels
   themselves for a classical model (which computes its features from them).
3. :func:`batched_logits`: both steps' output through the model, in batches
   (:func:`batched_outputs`: with the penultimate embeddings as well, for the
   out-of-distribution score), averaged over the bundle's test-time ``views``
   (:func:`over_views`: a cell's right-angle rotations and mirror images).

Steps 1 and 2 work in numpy (given torch tensors, they return torch tensors), so that an exported
classifier runs without importing torch (:mod:`leukoscope.inference.runtime`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from leukoscope.pixels import IMAGENET_MEAN, IMAGENET_STD, letterbox
from leukoscope.stain import STAINS, normalise_stain

if TYPE_CHECKING:
    import torch

    from leukoscope.data.dataset import CorruptPolicy, LoadReport
    from leukoscope.data.manifest import Manifest

#: Model frameworks: ``torch`` reads normalised float tensors, ``sklearn`` the uint8 pixels.
FRAMEWORKS = ("torch", "sklearn")
#: What a torch model sees of an image's colour: all of it, or its luminance only.
COLOURS = ("rgb", "gray")
# ITU-R BT.601 luma, as PIL's "L" mode.
_LUMA = (0.299, 0.587, 0.114)
#: Test-time views a classifier's outputs may be averaged over: the image alone, its four right-angle
#: rotations, or those and their mirror images (a cell on a slide has no up, down, left or right).
VIEWS = (1, 4, 8)


@dataclass
class Preprocessing:
    """How a classifier's input is made from an image (stored in ``bundle.json``)."""

    image_size: int
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    resize: str = "letterbox"
    segmentation: str | None = None
    """System E's colour-clustering segmentation (``lab_kmeans`` / ``hsv``) before resizing, or None."""
    cell_window_um: float | None = None
    """Smear analysis crops this many micrometres around each cell when the field's scale is known
    (:mod:`leukoscope.cell_window`); None: the cell's box plus a margin."""
    colour: str = "rgb"
    """``gray``: a torch model sees luminance only (copied to its three channels), so a lab's stain
    hue cannot be a cue. Applied in :meth:`model_input`, after training-time augmentation, so
    stain jitter still varies how dark nucleus, cytoplasm and background come out."""
    standardize: bool = False
    """Scale each image to zero mean and unit variance (per channel) instead of ``mean`` / ``std``:
    a lab's brightness and contrast cannot be a cue either."""
    stain: str | None = None
    """``macenko``: each image's stains unmixed and rebuilt in one reference's colours
    (:mod:`leukoscope.stain`) after the letterbox, so every model, torch or classical, sees
    every lab's smear in pbc's colours; ``white_balance``: each image's background brought to one
    neutral white (a camera's white balance and exposure cancel); None: the image's own colours."""
    views: int = 1
    """Test-time views (one of :data:`VIEWS`): every output (logits, embeddings, so the calibration and
    the OOD flag too) is the mean over the image's right-angle rotations (4) and their mirror images
    (8), at that many times the network's work (bundle format 8); 1: the image as it is."""

    def __post_init__(self) -> None:
        if self.views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS} (the image alone, its rotations, or those and their "
                             f"mirror images), got {self.views!r}")
        if self.stain is not None and self.stain not in STAINS:
            raise ValueError(f"unknown stain normalisation {self.stain!r} (expected one of {STAINS} or none)")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r} (expected one of {COLOURS})")
        if self.resize != "letterbox":
            raise ValueError(f"unknown resize {self.resize!r} (leukoscope letterboxes: 'letterbox')")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")

    # Cached objects are not dataclass fields: they stay out of bundle.json and of equality.
    @cached_property
    def segmenter(self) -> Callable[[Image.Image], Image.Image] | None:
        if not self.segmentation:
            return None
        from leukoscope.segmentation import Segmenter

        return Segmenter(method=self.segmentation)

    @property
    def styled(self) -> bool:
        """Whether a torch model sees other than the colour image at ``mean`` / ``std`` (bundle format 5)."""
        return self.colour != "rgb" or self.standardize

    def pixel_array(self, image: Image.Image) -> np.ndarray:
        """PIL RGB -> uint8 ``(3, S, S)``: segmentation (if any), letterbox, stain normalisation (if any)."""
        if self.segmenter is not None:
            image = self.segmenter(image)
        array = np.asarray(letterbox(image, self.image_size), dtype=np.uint8)
        if self.stain is not None:
            array = normalise_stain(array, self.stain)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def decoded_as(self) -> tuple[Any, ...]:
        """What :meth:`decode`'s pixels depend on: data decoded under one such key serves every preprocessing
        with that key (the rest is applied to the decoded pixels: :meth:`model_input`)."""
        return self.image_size, self.resize, self.segmentation, self.stain

    def pixels(self, image: Image.Image) -> "torch.Tensor":
        """:meth:`pixel_array` as a torch tensor."""
        import torch

        return torch.from_numpy(self.pixel_array(image))

    def decode(self, manifest: "Manifest", *, on_corrupt: "CorruptPolicy" = "skip", max_pixels: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               skip_with: str | None = None) -> tuple[torch.Tensor, "Manifest", "LoadReport"]:
        """Every image of ``manifest`` through :meth:`pixels`, once: (uint8 N x 3 x S x S, kept, report);
        ``skip_with``: see :func:`leukoscope.data.dataset.decode_manifest`."""
        from leukoscope.data.dataset import decode_manifest

        options: dict[str, Any] = {} if max_pixels is None else {"max_pixels": max_pixels}
        if skip_with is not None:
            options["skip_with"] = skip_with
        return decode_manifest(manifest, self.pixels, on_corrupt=on_corrupt, progress=progress, **options)

    def model_input(self, pixels: "np.ndarray | torch.Tensor", framework: str = "torch") -> "np.ndarray | torch.Tensor":
        """uint8 pixels (one image or a batch; a numpy array or a torch tensor) -> the model's input
        (float32, of the same kind)."""
        if framework == "sklearn":
            return pixels
        if framework != "torch":
            raise ValueError(f"unknown model framework {framework!r} (expected one of {FRAMEWORKS})")
        if isinstance(pixels, np.ndarray):
            return self._normalised(pixels)
        import torch

        return torch.from_numpy(self._normalised(pixels.cpu().numpy()))

    def _normalised(self, pixels: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        image = pixels.astype(np.float32) / np.float32(255.0)
        if not self.styled:
            return (image - mean) / std
        if self.colour == "gray":
            luma = np.asarray(_LUMA, dtype=np.float32).reshape(3, 1, 1)
            image = np.broadcast_to((image * luma).sum(axis=-3, keepdims=True), image.shape)
        if not self.standardize:
            return (image - mean) / std
        centre = image.mean(axis=(-2, -1), keepdims=True, dtype=np.float32)
        # The floor keeps a blank image (std 0) finite (TensorFlow's per_image_standardization floors it too);
        # ddof 1: torch's std
        spread = np.maximum(image.std(axis=(-2, -1), keepdims=True, ddof=1, dtype=np.float32), np.float32(1.0 / 255.0))
        return (image - centre) / spread


def framework_of(model: Any) -> str:
    """``sklearn`` for a classical model (features + pipeline), ``torch`` for an ``nn.Module``."""
    import torch

    return "torch" if isinstance(model, torch.nn.Module) else "sklearn"


def dihedral_views(pixels: "np.ndarray | torch.Tensor", views: int) -> "np.ndarray | torch.Tensor":
    """``views`` copies of a batch ``(N, C, S, S)``, view after view ``(views * N, C, S, S)``: the
    right-angle rotations, then (8) those of its mirror image. A numpy array or a torch tensor."""
    if views == 1:
        return pixels
    if isinstance(pixels, np.ndarray):
        copies = [np.rot90(pixels, k, axes=(-2, -1)) for k in range(4)]
        if views == 8:
            mirrored = np.swapaxes(pixels, -2, -1)
            copies += [np.rot90(mirrored, k, axes=(-2, -1)) for k in range(4)]
        return np.ascontiguousarray(np.concatenate(copies))
    import torch

    copies = [torch.rot90(pixels, k, dims=(-2, -1)) for k in range(4)]
    if views == 8:
        mirrored = pixels.transpose(-2, -1)
        copies += [torch.rot90(mirrored, k, dims=(-2, -1)) for k in range(4)]
    return torch.cat(copies).contiguous()


def view_back(maps: np.ndarray, view: int) -> np.ndarray:
    """Undo view ``view`` of :func:`dihedral_views` on a batch of square maps ``(N, S, S)`` (e.g. the
    heatmaps of that view's images), so that every view's map lies as the image does."""
    rotation = view % 4
    back = np.rot90(maps, -rotation, axes=(-2, -1))
    return np.swapaxes(back, -2, -1) if view >= 4 else back


def over_views(outputs: Callable[[Any], tuple[Any, ...]], pixels: "np.ndarray | torch.Tensor",
               views: int) -> tuple[np.ndarray, ...]:
    """``outputs`` (a batch -> arrays of one row per image) of every view of ``pixels``
    (:func:`dihedral_views`), averaged per image: logits and embeddings alike."""
    results = outputs(dihedral_views(pixels, views))
    averaged = []
    for result in results:
        array = result.numpy() if hasattr(result, "numpy") else np.asarray(result)
        averaged.append(array.reshape(views, -1, *array.shape[1:]).mean(axis=0, dtype=array.dtype)
                        if views > 1 else array)
    return tuple(averaged)


def batched_logits(model: Any, pixels: "np.ndarray | torch.Tensor", preprocessing: Preprocessing,
                   device: "str | torch.device" = "cpu", batch_size: int = 64) -> np.ndarray:
    """Uncalibrated logits ``(N, classes)`` of uint8 ``pixels`` (N, 3, S, S), in eval mode; a network's
    averaged over ``preprocessing.views``."""
    import torch

    if framework_of(model) == "sklearn":  # one view: a classical bundle cannot set more (BundleInfo)
        return np.asarray(model.predict_logits(pixels), dtype=np.float64)
    views = preprocessing.views
    pixels = torch.as_tensor(pixels)
    device = torch.device(device)
    model.eval()

    def logits(batch: torch.Tensor) -> tuple[torch.Tensor]:
        return (model(preprocessing.model_input(batch).to(device)).float().cpu(),)

    step = max(1, batch_size // views)  # images per forward pass: each brings its views
    with torch.no_grad():
        outputs = [over_views(logits, pixels[start:start + step], views)[0] for start in range(0, len(pixels), step)]
    if not outputs:
        raise ValueError("no images to score")
    return np.concatenate(outputs)


def batched_outputs(model: Any, pixels: "np.ndarray | torch.Tensor", preprocessing: Preprocessing,
                    device: "str | torch.device" = "cpu", batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Uncalibrated logits ``(N, classes)`` and penultimate embeddings ``(N, d)`` of uint8 ``pixels``
    from one forward pass: a CNN's input to its final linear layer, a classical model's
    standardised selected features; a network's averaged over ``preprocessing.views``."""
    if framework_of(model) == "sklearn":  # one view: a classical bundle cannot set more (BundleInfo)
        features = model.features(pixels)
        return (np.asarray(model.logits_features(features), dtype=np.float64),
                np.asarray(model.embed_features(features), dtype=np.float64))
    import torch

    from leukoscope.models.embedding import logits_and_embeddings

    views = preprocessing.views
    pixels = torch.as_tensor(pixels)
    device = torch.device(device)
    model.eval()

    def both(batch: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out, embedded = logits_and_embeddings(model, preprocessing.model_input(batch).to(device))
        return out.float().cpu(), embedded

    logits, embeddings = [], []
    step = max(1, batch_size // views)  # images per forward pass: each brings its views
    with torch.no_grad():
        for start in range(0, len(pixels), step):
            out, embedded = over_views(both, pixels[start:start + step], views)
            logits.append(out)
            embeddings.append(embedded)
    if not logits:
        raise ValueError("no images to score")
    return np.concatenate(logits), np.concatenate(embeddings)


def stack_pixels(images: Sequence[Image.Image], preprocessing: Preprocessing) -> np.ndarray:
    """A uint8 batch ``(N, 3, S, S)`` of PIL images through :meth:`Preprocessing.pixel_array`."""
    return np.stack([preprocessing.pixel_array(image) for image in images])
