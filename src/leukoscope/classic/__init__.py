"""Classical baselines: hand-made image features and scikit-learn pipelines.

- :mod:`leukoscope.classic.spec`: :class:`FeatureSpec`, which feature families
  and how many bins (the ``features:`` section of an experiment config).
- :mod:`leukoscope.classic.features`: colour histograms, DFT magnitude, GLCM and
  LBP texture, nucleus shape; ``extract_features(images, spec)``.
- :mod:`leukoscope.models.classic`: ``svm_rbf``, ``naive_bayes``,
  ``decision_tree``, ``random_forest``, ``logistic_regression`` and
  ``gradient_boosting`` in the model registry (``kind="classic"``), and
  :class:`ClassicModel`, features + pipeline as one predictor.
- :class:`leukoscope.engine.learner.SklearnLearner`: the training behind
  ``leukoscope train --model svm_rbf`` (same split, report and bundle as a CNN,
  through :mod:`leukoscope.tasks.classify`); :mod:`leukoscope.bundle` saves the
  pipeline with skops (no pickle).

This package imports only :mod:`spec` eagerly, so reading a config stays cheap.
"""

from leukoscope.classic.spec import FEATURE_FAMILIES, FeatureSpec

__all__ = ["FEATURE_FAMILIES", "FeatureSpec"]
