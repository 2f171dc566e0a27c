"""Out-of-distribution statistics of a classifier: fitted at the end of training, or for an
existing bundle by ``leukoscope calibrate-ood`` (which may also change the bundle's test-time views,
refitting its temperature with them: every output a calibration rests on changes with the views).

Class means and shared precision come from the *training* split's embeddings, the
threshold from the *validation* split's scores (:func:`leukoscope.evaluation.ood.calibrate_ood`),
so that about 5% of new in-distribution images are flagged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
from rich.markup import escape

from leukoscope.bundle import load_bundle, read_bundle_info, save_ood
from leukoscope.data.manifest import DatasetError, Manifest
from leukoscope.data.readers import read_dataset
from leukoscope.data.splits import Split, make_split
from leukoscope.evaluation.calibration import temperature_fit
from leukoscope.evaluation.ood import DEFAULT_METHOD, DEFAULT_QUANTILE, OodStats, calibrate_ood
from leukoscope.light import fit_light_range
from leukoscope.models.embedding import EmbeddingError, default_stages
from leukoscope.preprocessing import batched_outputs, framework_of
from leukoscope.progress import counter_callback, progress_bar, say
from leukoscope.proportions import wilson_interval
from leukoscope.tasks.trained_labels import labels_as_trained

if TYPE_CHECKING:
    from leukoscope.engine.data_prep import PreparedData
    from leukoscope.engine.learner import Learner

log = logging.getLogger(__name__)

#: Training images the class Gaussians are fitted on, at most (a seeded sample beyond it):
#: the means and a shrunk covariance are stable long before, and the forward pass costs time.
MAX_FIT_IMAGES = 10_000
#: Fewer validation images than this and the threshold (their scores' 95th percentile) is said to be unsteady.
MIN_THRESHOLD_IMAGES = 30


def record_light(stats: OodStats, pixels, preprocessing) -> None:
    """The range of the training images' light (:mod:`leukoscope.light`) in ``stats``' details, for a
    model that sees each image's own light (no ``data.stain``, no gray or standardised input, which cancel a
    camera's gains themselves): `analyze` says of a field outside it."""
    if preprocessing is None or preprocessing.stain is not None or preprocessing.styled:
        return
    light = fit_light_range(np.asarray(pixels))
    if light is not None:
        stats.details["light"] = light.to_json()


def fit_sample(n: int, seed: int = 0, limit: int = MAX_FIT_IMAGES) -> np.ndarray | None:
    """Indices of a seeded sample of ``limit`` of ``n`` images, or None when all are used."""
    if n <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def stats_from_outputs(train_embeddings: np.ndarray, train_targets: np.ndarray, held_logits: np.ndarray,
                       held_embeddings: np.ndarray, framework: str, *, method: str = DEFAULT_METHOD,
                       quantile: float = DEFAULT_QUANTILE, threshold_from: str = "val",
                       widths: Sequence[int] | None = None, stages: Sequence[str] = ()) -> OodStats:
    """:func:`calibrate_ood`, with the energy score left out for a classical model (its logits
    are log-probabilities, whose energy is always 0)."""
    energy = framework == "torch"
    return calibrate_ood(train_embeddings, train_targets, held_logits, held_embeddings,
                         method=method if energy else "mahalanobis", quantile=quantile, energy=energy,
                         threshold_from=threshold_from, widths=widths, stages=stages)


def read_stages(model, stages: Sequence[str], preprocessing, pixels) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Set the stages ``model``'s embedding reads (a torch model; a classical one has none) and
    return them with the embedding's part widths (None: one part), measured on the first image of
    ``pixels`` (uint8, as ``preprocessing`` takes them)."""
    if framework_of(model) != "torch":
        if stages:
            raise EmbeddingError("a classical model has no stages to read; its embedding is its selected features")
        return (), None
    from leukoscope.models.embedding import embedding_widths, set_embedding_stages

    set_embedding_stages(model, stages)
    if not stages:
        return (), None
    device = next(model.parameters()).device
    return tuple(stages), embedding_widths(model, preprocessing.model_input(pixels[:1]).to(device))


def calibrate_run(learner: "Learner", prepared: "PreparedData", *, method: str = DEFAULT_METHOD,
                  seed: int = 0, stages: Sequence[str] = ()) -> OodStats | None:
    """The OOD statistics of a freshly trained model (None, with a warning, when its embedding cannot
    be read), on its embedding with ``stages`` (:func:`leukoscope.models.embedding.default_stages`).
    Without a validation split the threshold comes from the training split, whose scores
    are lower: more false alarms on new images, said in the log and in ``threshold_from``."""
    train = prepared.parts["train"]
    held_name = "val" if "val" in prepared.parts else "train"
    if held_name == "train":
        log.warning("no validation split: the OOD threshold is set on the training images (expect more than 5% "
                    "of new in-distribution images to be flagged, many more with few training images)")
    elif len(prepared.parts["val"].targets) < MIN_THRESHOLD_IMAGES:
        # Its 95th percentile of a handful of scores: a lab's 6 validation cells put it where 25% of new cells of
        # the same lab were flagged.
        log.warning("the OOD threshold rests on %d validation images (fewer than %d): the share of new images of "
                    "this lab flagged 'unlike the training data' may be far above 5%%; add images, or read the "
                    "flag as a hint", len(prepared.parts["val"].targets), MIN_THRESHOLD_IMAGES)
    sample = fit_sample(len(train.targets), seed)
    # The whole tensor when it is not sampled: a classical learner's features are cached for it.
    images = train.images if sample is None else train.images[torch_index(sample)]
    targets = np.asarray(train.targets) if sample is None else np.asarray(train.targets)[sample]
    try:
        stages, widths = read_stages(learner.model, stages, getattr(learner, "preprocessing", None), images)
        _, train_embeddings = learner.outputs(images)
        held = prepared.parts[held_name]
        held_logits, held_embeddings = learner.outputs(held.images)
        stats = stats_from_outputs(train_embeddings, targets, held_logits, held_embeddings,
                                   framework_of(learner.model), method=method, threshold_from=held_name,
                                   widths=widths, stages=stages)
        record_light(stats, images, getattr(learner, "preprocessing", None))
        if "test" in prepared.parts:
            logits, embeddings = learner.outputs(prepared.parts["test"].images)
            stats.details["test_unfamiliar_share"] = round(float(stats.unfamiliar(
                stats.scores(logits, embeddings)).mean()), 4)
    except (EmbeddingError, ValueError) as exc:
        log.warning("no out-of-distribution statistics for this model: %s", exc)
        return None
    share = stats.details.get("test_unfamiliar_share")
    say(f"OOD flag: {stats.method} threshold {stats.threshold:.4g} ({100 * stats.quantile:g}th percentile of "
        f"{held_name}){'' if share is None else f'; {100 * share:.1f}% of test images flagged'}")
    if share is not None:
        excess = excess_flagged_warning(share, len(prepared.parts["test"].targets), stats.quantile,
                                        len(prepared.parts[held_name].targets), held_name)
        if excess:
            log.warning("%s", excess)
    return stats


def excess_flagged_warning(share: float, n_test: int, quantile: float, n_held: int, held_name: str) -> str | None:
    """The warning when the share of a run's own test images flagged unfamiliar is clearly above the ``1 - quantile``
    the threshold aims at (the lower end of its 95% Wilson interval above it): the demo flagged 22.5% of its 40 test
    images, same lab, never trained on, where the README promises about 5%, and nothing said so."""
    flagged = round(share * n_test)
    if n_test == 0 or wilson_interval(flagged, n_test)[0] <= 1 - quantile:
        return None
    return (f"the OOD flag calls {flagged} of this run's {n_test} test images unfamiliar ({100 * share:.1f}%), images "
            f"of the training's own kind, where its threshold aims at {100 * (1 - quantile):g}%: it would doubt "
            f"many of "
            f"this lab's new images too. Its threshold is the {100 * quantile:g}th percentile of {n_held} {held_name} "
            f"images' scores; with more of them (or `leukoscope calibrate-ood` on more images of this lab) it is "
            f"steadier")


def torch_index(indices: np.ndarray):
    import torch

    return torch.as_tensor(indices, dtype=torch.long)


# --------------------------------------------------------------------------- an existing bundle
def fit_parts(bundle: str | Path, data: str | Path, split_file: str | Path | None = None,
              seed: int = 0, need_val: str = "") -> tuple[Manifest, Manifest, str, str]:
    """(images to fit on, images to set the threshold on, the name of that part, where they came
    from) for ``data``.

    The bundle's recorded split (or ``split_file``) when ``data`` holds images of its train
    part: its train and val parts (without a val part, a fifth of the train part held out: the test part
    is never fitted on), so the statistics describe
    what the model was trained on. Otherwise a fresh 80/20 duplicate-aware split of ``data``:
    the statistics then describe ``data`` (e.g. one site's images), and the note says so.
    ``need_val``: what needs a validation part (said in the error raised, before any fresh split, when
    the split has none)."""
    info = read_bundle_info(bundle, task="classify")
    manifest, relabelled = labels_as_trained(read_dataset(data, require_labels=True, check_files=True), info, data)
    for line in relabelled:  # a bundle trained with a class_map knows no label of its own data as written
        say(f"note: {escape(line)}")
    manifest = manifest.with_classes(info.classes)
    path = Path(split_file) if split_file is not None else info.split_file
    if split_file is not None and not path.is_file():
        raise DatasetError(f"{path}: split file does not exist")
    if path is not None and path.is_file():
        split = Split.load(path, data_root=manifest.root)
        wanted = {s.path.resolve() for s in manifest}
        def part(name: str) -> Manifest:
            if name not in split.assignments:
                return Manifest([], list(info.classes))
            found = split.manifest(name)
            found = found.filter([s.path.resolve() in wanted for s in found])
            return labels_as_trained(found, info, path)[0].with_classes(info.classes)

        train = part("train")
        has_val = bool(split.assignments.get("val"))
        held = part("val") if has_val else Manifest([], list(info.classes))
        if len(train) and len(held):
            return train, held, "val", f"the train and val parts of {path}"
        if len(train):
            # No val images: a fifth of the train part sets the threshold; the test part stays what it is for
            missing = f"{data} holds none of the val part of {path}" if has_val else f"{path} has no val part"
            if need_val:
                raise DatasetError(f"{need_val} a validation part, and {missing}: leave --views out")
            inner = make_split(train, ratios=(0.8, 0.2), seed=seed)
            return (inner.manifest("train"), inner.manifest("test"), "held-out train",
                    f"the train part of {path}, a fifth of it held out ({missing}; its test part is left alone)")
        if split_file is not None:
            raise DatasetError(f"{data} has no images in the train and val parts of {path}"
                               if split.assignments.get("val") else
                               f"{path} has no val part and {data} no images in its train part")
        reason = f"{data} is not the bundle's training data (split {path})"
    else:
        reason = ("the bundle records no training split" if path is None
                  else f"the bundle's training split {path} is gone")
    if need_val:
        raise DatasetError(f"{need_val} a validation part of the split the bundle was trained with, and {reason}: "
                           f"give its training data (and --split-file if its recorded split moved)")
    split = make_split(manifest, ratios=(0.8, 0.2), seed=seed)
    return (split.manifest("train"), split.manifest("test"), "held-out",
            f"a new 80/20 split of {data} ({reason})")


def check_views_calibration(bundle: str | Path, views: int) -> None:
    """Refuse test-time views on a classical model (its hand-made features are computed once per
    image). (:func:`calibrate_bundle` also refuses them without a validation part of the bundle's
    training split to refit the temperature on: its test part would be fitted on, or another
    site's images would move it there silently.)"""
    info = read_bundle_info(bundle, task="classify")
    if views != 1 and info.framework != "torch":
        raise DatasetError(f"test-time views are for networks; {info.model_name} is a classical model (views 1 only)")


def calibrate_bundle(bundle: str | Path, data: str | Path, *, split_file: str | Path | None = None,
                     method: str = DEFAULT_METHOD, quantile: float = DEFAULT_QUANTILE, on_corrupt: str = "skip",
                     device: str = "cpu", seed: int = 0, show_progress: bool = True,
                     stages: Sequence[str] | None = None, views: int | None = None) -> tuple[OodStats, str]:
    """Fit and store the OOD statistics of an existing classifier ``bundle`` on labelled ``data``
    (see :func:`fit_parts`); returns them and where the images came from. ``stages``: the model's
    stages the score reads beside its penultimate embedding (default: its architecture's
    :func:`~leukoscope.models.embedding.default_stages`; empty: the penultimate embedding alone).
    ``views``: the bundle's test-time views from now on (:data:`leukoscope.preprocessing.VIEWS`); its
    temperature is then refitted on the held-out part's averaged logits, as training fits it on its
    validation part, and stored with the statistics in one write of ``bundle.json``."""
    if views is not None:
        check_views_calibration(bundle, views)
    need_val = "" if views is None else "--views refits the temperature on"
    # with need_val, fit_parts gives the val part or refuses
    train, held, held_name, source = fit_parts(bundle, data, split_file, seed, need_val=need_val)
    sample = fit_sample(len(train), seed)
    if sample is not None:
        train = train.subset(sample.tolist())
    model, info = load_bundle(bundle, device, task="classify")
    if stages is None:
        stages = default_stages(info.model_name) if info.framework == "torch" else ()
    preprocessing = info.preprocessing if views is None else replace(info.preprocessing, views=views)
    outputs, widths = {}, None
    for name, part in (("fit", train), ("threshold", held)):
        with progress_bar(len(part), f"decoding ({name})", enabled=show_progress) as update:
            pixels, kept, _ = preprocessing.decode(part, on_corrupt=on_corrupt, progress=counter_callback(update),
                                                   skip_with="--on-corrupt skip")
        if len(kept) == 0:
            raise DatasetError(f"no readable image to {name} the OOD statistics on ({source})")
        if name == "fit":
            stages, widths = read_stages(model, stages, preprocessing, pixels)
            fit_pixels = pixels
        outputs[name] = (*batched_outputs(model, pixels, preprocessing, device), np.asarray(kept.targets))
    _, fit_embeddings, fit_targets = outputs["fit"]
    held_logits, held_embeddings, held_targets = outputs["threshold"]
    stats = stats_from_outputs(fit_embeddings, fit_targets, held_logits, held_embeddings, info.framework,
                               method=method, quantile=quantile, threshold_from=held_name, widths=widths,
                               stages=stages)
    stats.details["fitted_on"] = source
    record_light(stats, fit_pixels, preprocessing)
    if views is None:
        save_ood(bundle, *stats.to_parts())
        return stats, source
    temperature = temperature_fit(held_logits, held_targets).temperature
    say(f"{views} test-time views; temperature {info.temperature:.3g} -> {temperature:.3g} (fitted on "
        f"{len(held_targets)} {held_name} images)")
    save_ood(bundle, *stats.to_parts(), views=views, temperature=temperature,
             note=f"{views} test-time views set by calibrate-ood; temperature refitted on the {held_name} part "
                  f"({len(held_targets)} images) of {source}")
    return stats, source
