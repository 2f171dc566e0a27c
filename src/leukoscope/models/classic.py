"""Classical classifiers as scikit-learn pipelines, in the same registry as the CNNs.

Every builder returns ``Pipeline([minmax, select, standardize, classifier])``:

1. ``MinMaxScaler``: maps each training feature to [0, 1]. The chi-square test
   is only defined for non-negative features (counts, frequencies), and the
   GLCM correlation is negative at times; scaling (not clipping) keeps every
   value and only shifts it. Test images outside the training range pass
   through unclipped: the chi-square scores are needed at fit time only.
2. ``SelectKBest(chi2, k)``: system C's univariate chi-square selection.
3. ``StandardScaler``: system C's standardisation (zero mean, unit variance of
   the selected features; an affine map of the raw features).
4. The classifier.

Features are extracted before the pipeline, from the decoded, letterboxed
images (:mod:`leukoscope.classic.features`); :class:`ClassicModel` holds both
and predicts from ``uint8`` images, as a CNN does.

``gradient_boosting`` is scikit-learn's histogram gradient boosting (LightGBM's
algorithm): same family as ``GradientBoostingClassifier``, an order of
magnitude faster on thousands of images, with native multi-class support.
``svm_rbf`` gets probabilities from Platt scaling fitted on cross-validated
decision values (``CalibratedClassifierCV(ensemble=False)``, what
``SVC(probability=True)`` did before its deprecation in scikit-learn 1.9).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_selection import SelectKBest, chi2
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from leukoscope.classic.features import FeatureExtractor
from leukoscope.classic.spec import FeatureSpec
from leukoscope.models.registry import register_model

CLASSIC_MODELS: tuple[str, ...] = (
    "svm_rbf", "naive_bayes", "decision_tree", "random_forest", "logistic_regression", "gradient_boosting",
)

#: Probabilities are clipped here before the log, so that "logits" stay finite.
MIN_PROBABILITY = 1e-7

ClassWeight = Literal["balanced"] | None


def _check_common(num_classes: int, weights: Any, freeze_backbone: bool) -> None:
    if weights is not None:
        raise ValueError("model.weights is for CNNs; classical models are trained from the features alone")
    if freeze_backbone:
        raise ValueError("model.freeze_backbone is for CNNs; classical models have no backbone")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")


def make_pipeline(classifier: Any, k_best: int | str = "all") -> Pipeline:
    """The shared ``minmax -> chi2 SelectKBest -> standardize -> classifier`` pipeline."""
    return Pipeline([
        ("minmax", MinMaxScaler()),
        ("select", SelectKBest(chi2, k=k_best)),
        ("standardize", StandardScaler()),
        ("classifier", classifier),
    ])


@register_model("svm_rbf", kind="classic")
def svm_rbf(num_classes: int, k_best: int | str = "all", class_weight: ClassWeight = None, C: float = 1.0,
            gamma: float | str = "scale", cv: int = 5, random_state: int | None = 0, weights: Any = None,
            freeze_backbone: bool = False) -> Pipeline:
    """SVM with an RBF kernel on hand-made features (system C); Platt-scaled probabilities."""
    _check_common(num_classes, weights, freeze_backbone)
    svc = SVC(kernel="rbf", C=C, gamma=gamma, class_weight=class_weight, random_state=random_state)
    return make_pipeline(CalibratedClassifierCV(svc, method="sigmoid", cv=cv, ensemble=False), k_best)


@register_model("naive_bayes", kind="classic")
def naive_bayes(num_classes: int, k_best: int | str = "all", class_weight: ClassWeight = None,
                var_smoothing: float = 1e-9, weights: Any = None, freeze_backbone: bool = False) -> Pipeline:
    """Gaussian naive Bayes on hand-made features (system C); balanced = equal class priors."""
    _check_common(num_classes, weights, freeze_backbone)
    priors = np.full(num_classes, 1.0 / num_classes) if class_weight == "balanced" else None
    return make_pipeline(GaussianNB(priors=priors, var_smoothing=var_smoothing), k_best)


@register_model("decision_tree", kind="classic")
def decision_tree(num_classes: int, k_best: int | str = "all", class_weight: ClassWeight = None,
                  max_depth: int | None = None, min_samples_leaf: int = 2, random_state: int | None = 0,
                  weights: Any = None, freeze_backbone: bool = False) -> Pipeline:
    """Decision tree (CART) on hand-made features (system C)."""
    _check_common(num_classes, weights, freeze_backbone)
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                                  class_weight=class_weight, random_state=random_state)
    return make_pipeline(tree, k_best)


@register_model("random_forest", kind="classic")
def random_forest(num_classes: int, k_best: int | str = "all", class_weight: ClassWeight = None,
                  n_estimators: int = 200, max_depth: int | None = None, min_samples_leaf: int = 1,
                  n_jobs: int | None = None, random_state: int | None = 0, weights: Any = None,
                  freeze_backbone: bool = False) -> Pipeline:
    """Random forest on hand-made features (system C)."""
    _check_common(num_classes, weights, freeze_backbone)
    forest = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                                    class_weight=class_weight, n_jobs=n_jobs, random_state=random_state)
    return make_pipeline(forest, k_best)


@register_model("logistic_regression", kind="classic")
def logistic_regression(num_classes: int, k_best: int | str = "all", class_weight: ClassWeight = None,
                        C: float = 1.0, max_iter: int = 2000, weights: Any = None,
                        freeze_backbone: bool = False) -> Pipeline:
    """Multinomial logistic regression on hand-made features."""
    _check_common(num_classes, weights, freeze_backbone)
    return make_pipeline(LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight), k_best)


@register_model("gradient_boosting", kind="classic")
def gradient_boosting(num_classes: int, k_best: int | str = "all", class_weight: ClassWeight = None,
                      max_iter: int = 200, learning_rate: float = 0.1, max_leaf_nodes: int | None = 31,
                      random_state: int | None = 0, weights: Any = None, freeze_backbone: bool = False) -> Pipeline:
    """Histogram gradient boosting on hand-made features."""
    _check_common(num_classes, weights, freeze_backbone)
    booster = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=learning_rate,
                                             max_leaf_nodes=max_leaf_nodes, early_stopping=False,
                                             class_weight=class_weight, random_state=random_state)
    return make_pipeline(booster, k_best)


class ClassicModel:
    """Feature extraction + a fitted pipeline: ``uint8`` images in, log-probabilities out.

    Quacks like the parts of an ``nn.Module`` the prediction path uses
    (``eval()``, ``to()``, calling it on a ``N x 3 x S x S`` uint8 batch gives
    a float tensor of logits), so :class:`~leukoscope.inference.predictor.CellClassifier`
    serves CNN and classical bundles alike. Its "logits" are log-probabilities:
    ``softmax(logits) == probabilities``.
    """

    framework = "sklearn"

    def __init__(self, pipeline: Pipeline, spec: FeatureSpec | dict, num_classes: int,
                 name: str = "classic") -> None:
        self.pipeline = pipeline
        self.extractor = FeatureExtractor(spec)
        self.spec = self.extractor.spec
        self.num_classes = num_classes
        self.name = name

    # ---------------------------------------------------------------- fitting
    def fit_features(self, features: np.ndarray, targets: np.ndarray) -> "ClassicModel":
        targets = np.asarray(targets)
        classifier = self.pipeline.steps[-1][1]
        if isinstance(classifier, CalibratedClassifierCV) and isinstance(classifier.cv, int):
            # Stratified k-fold needs k images of every class; small data sets get fewer folds.
            smallest = int(np.bincount(targets)[np.unique(targets)].min())
            if smallest < 2:
                raise ValueError(f"{self.name}: every class needs at least 2 training images for the "
                                 "cross-validated probability calibration")
            classifier.set_params(cv=min(classifier.cv, smallest))
        if isinstance(classifier, GaussianNB) and classifier.priors is not None:
            # equal priors over the classes present: GaussianNB refuses priors for classes it never sees, and a
            # class absent from training gets probability 0 (predict_proba_features) as in every other model
            present = len(np.unique(targets))
            classifier.set_params(priors=np.full(present, 1.0 / present))
        with warnings.catch_warnings():
            # chi2 divides by zero for a feature that is constant on the training set;
            # SelectKBest then ranks it last, which is right.
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*constant.*", category=UserWarning)
            self.pipeline.fit(features, targets)
        return self

    # ------------------------------------------------------------- predicting
    def features(self, images: Any) -> np.ndarray:
        return self.extractor.transform(images)

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        """``(N, num_classes)`` probabilities; classes absent from training get 0."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            partial = self.pipeline.predict_proba(features)
        probs = np.zeros((len(features), self.num_classes))
        probs[:, np.asarray(self.pipeline.classes_, dtype=np.int64)] = partial
        return probs

    def logits_features(self, features: np.ndarray) -> np.ndarray:
        probs = np.clip(self.predict_proba_features(features), MIN_PROBABILITY, 1.0)
        return np.log(probs / probs.sum(axis=1, keepdims=True))

    def embed_features(self, features: np.ndarray) -> np.ndarray:
        """The pipeline's input to its classifier (scaled, selected, standardised features): the
        embedding an out-of-distribution score reads, as a CNN's penultimate layer."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            return np.asarray(self.pipeline[:-1].transform(features), dtype=np.float64)

    def predict_proba(self, images: Any) -> np.ndarray:
        return self.predict_proba_features(self.features(images))

    def predict_logits(self, images: Any) -> np.ndarray:
        """Log-probabilities ``(N, num_classes)`` of ``N x 3 x S x S`` uint8 images."""
        if len(images) == 0:
            return np.zeros((0, self.num_classes))
        return self.logits_features(self.features(images))

    def selected_features(self) -> list[str]:
        """Names of the features the chi-square step kept, best score first."""
        select = self.pipeline.named_steps["select"]
        support = select.get_support(indices=True)
        scores = np.nan_to_num(select.scores_[support], nan=-np.inf)
        return [self.extractor.names[i] for i in support[np.argsort(-scores, kind="stable")]]

    # ------------------------------------------------- nn.Module look-alikes
    def __call__(self, images: Any):
        import torch

        if hasattr(images, "dtype") and str(images.dtype) not in ("torch.uint8", "uint8"):
            raise TypeError("a classical model takes uint8 images (N x 3 x S x S), not normalised tensors")
        return torch.from_numpy(self.predict_logits(images)).float()

    def eval(self) -> "ClassicModel":
        return self

    def train(self, mode: bool = True) -> "ClassicModel":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "ClassicModel":
        return self  # scikit-learn runs on the CPU

    def __repr__(self) -> str:
        return f"ClassicModel({self.name}, {len(self.extractor)} features, {self.num_classes} classes)"
