"""Bundles of classical models: the same directory format as a CNN's, pipeline saved with skops.

```
bundle/
  bundle.json   framework "sklearn", model name, classes, preprocessing, feature_spec, metrics, ...
  model.skops   the fitted scikit-learn pipeline
```

Why skops and not pickle/joblib: unpickling runs whatever code the file names,
so a bundle from elsewhere could take over the machine. skops stores the
pipeline as data and, on loading, refuses every type that is not on a trust
list. Loading here trusts skops' own defaults (scikit-learn estimators, numpy)
plus the few extra types our pipelines need (:data:`TRUSTED_TYPES`: the
``chi2`` scoring function, tree structures, SVM calibrators) and nothing
else; a file that needs any other type is refused with the types named.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sklearn

import leukoscope
from leukoscope.inference.bundle import BUNDLE_FILE, BundleError, BundleInfo

CLASSIC_WEIGHTS_FILE = "model.skops"

#: Types beyond skops' defaults that leukoscope's classical pipelines contain.
TRUSTED_TYPES: frozenset[str] = frozenset({
    "sklearn.feature_selection._univariate_selection.chi2",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
})


def save_classic_bundle(directory: str | Path, model, info: BundleInfo) -> Path:
    """Write a :class:`~leukoscope.classic.models.ClassicModel` and ``info`` into ``directory``."""
    import skops.io as sio

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info.framework = "sklearn"
    info.feature_spec = model.spec.model_dump(mode="json")
    info.provenance = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "leukoscope": leukoscope.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
        **info.provenance,
    }
    weights_tmp = directory / (CLASSIC_WEIGHTS_FILE + ".tmp")
    sio.dump(model.pipeline, weights_tmp)
    json_tmp = directory / (BUNDLE_FILE + ".tmp")
    json_tmp.write_text(json.dumps(info.to_json(), indent=2))
    weights_tmp.replace(directory / CLASSIC_WEIGHTS_FILE)
    json_tmp.replace(directory / BUNDLE_FILE)
    return directory


def load_classic_model(directory: str | Path, info: BundleInfo):
    """The :class:`~leukoscope.classic.models.ClassicModel` of a classical bundle (safe loading)."""
    import skops.io as sio

    from leukoscope.classic.models import ClassicModel

    directory = Path(directory)
    path = directory / CLASSIC_WEIGHTS_FILE
    if not path.is_file():
        raise BundleError(f"{directory}: model file {CLASSIC_WEIGHTS_FILE} is missing")
    if info.feature_spec is None:
        raise BundleError(f"{directory}: a classical bundle needs a feature_spec in {BUNDLE_FILE}")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated file
        raise BundleError(f"{path}: cannot read the model: {exc}") from None
    refused = sorted(set(untrusted) - TRUSTED_TYPES)
    if refused:
        raise BundleError(f"{path}: refusing to load types that are not on leukoscope's trust list: {refused}")
    try:
        pipeline = sio.load(path, trusted=list(untrusted))
    except Exception as exc:  # noqa: BLE001
        raise BundleError(f"{path}: cannot load the model: {exc}") from None
    try:
        model = ClassicModel(pipeline, info.feature_spec, len(info.classes), name=info.model_name)
    except ValueError as exc:
        raise BundleError(f"{directory}: invalid feature_spec: {exc}") from None
    n_in = getattr(pipeline, "n_features_in_", None)
    if n_in is not None and n_in != len(model.extractor):
        raise BundleError(f"{path}: the pipeline expects {n_in} features but feature_spec gives "
                          f"{len(model.extractor)}")
    known = np.asarray(getattr(pipeline, "classes_", []))
    if known.size and (known.min() < 0 or known.max() >= len(info.classes)):
        raise BundleError(f"{path}: the pipeline predicts classes {known.tolist()} but the bundle names "
                          f"{len(info.classes)}")
    return model
