"""The classical models in the registry: pipelines, probabilities, the ClassicModel wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.pipeline import Pipeline

from leukoscope.models.classic import CLASSIC_MODELS, ClassicModel
from leukoscope.classic.spec import FeatureSpec
from leukoscope.models import create_model, list_models, model_entry


def _blobs(n_per_class: int = 15, n_classes: int = 3, n_features: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(3 * k, 1.0, (n_per_class, n_features)) for k in range(n_classes)])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return x, y


def test_registry_lists_the_six_classic_models():
    assert set(list_models("classic")) == set(CLASSIC_MODELS)
    assert len(CLASSIC_MODELS) == 6
    for name in CLASSIC_MODELS:
        assert model_entry(name).kind == "classic"
        assert model_entry(name).description
    assert "svm_rbf" not in list_models("classifier")


def test_every_builder_gives_minmax_chi2_standardize_classifier():
    for name in CLASSIC_MODELS:
        pipeline = create_model(name, num_classes=3, k_best=5)
        assert isinstance(pipeline, Pipeline)
        assert [step for step, _ in pipeline.steps] == ["minmax", "select", "standardize", "classifier"]
        assert pipeline.named_steps["select"].k == 5
        assert pipeline.named_steps["select"].score_func.__name__ == "chi2"


@pytest.mark.parametrize("name", CLASSIC_MODELS)
def test_every_classic_model_learns_separable_blobs(name):
    x, y = _blobs()
    options = {"max_iter": 20} if name == "gradient_boosting" else {"n_estimators": 20} if name == "random_forest" else {}
    model = ClassicModel(create_model(name, num_classes=3, k_best=6, class_weight="balanced", **options),
                         FeatureSpec(), 3, name=name)
    model.fit_features(x, y)
    probs = model.predict_proba_features(x)
    assert probs.shape == (len(y), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert (probs.argmax(1) == y).mean() > 0.9
    logits = model.logits_features(x)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(np.exp(logits).sum(axis=1), 1.0, atol=1e-5)  # log-probabilities


@pytest.mark.parametrize("name, options", [("logistic_regression", {}),
                                           ("naive_bayes", {"class_weight": "balanced"})])
def test_a_class_missing_from_training_gets_probability_zero(name, options):
    """(Balanced naive Bayes built equal priors for every class, which GaussianNB refused for a class it
    never saw.)"""
    x, y = _blobs(n_classes=2)
    model = ClassicModel(create_model(name, num_classes=3, **options), FeatureSpec(), 3)
    model.fit_features(x, y)
    probs = model.predict_proba_features(x)
    assert (probs[:, 2] == 0).all() and (probs.argmax(1) == y).mean() > 0.9


def test_cnn_only_options_are_refused():
    with pytest.raises(ValueError, match="weights"):
        create_model("svm_rbf", num_classes=2, weights="x.safetensors")
    with pytest.raises(ValueError, match="freeze_backbone"):
        create_model("random_forest", num_classes=2, freeze_backbone=True)
    with pytest.raises(ValueError, match="at least 2 classes"):
        create_model("naive_bayes", num_classes=1)


def test_svm_calibration_folds_shrink_for_small_classes():
    x, y = _blobs(n_per_class=3, n_classes=2)
    model = ClassicModel(create_model("svm_rbf", num_classes=2), FeatureSpec(), 2).fit_features(x, y)
    assert model.pipeline.named_steps["classifier"].cv == 3
    with pytest.raises(ValueError, match="at least 2 training images"):
        ClassicModel(create_model("svm_rbf", num_classes=2), FeatureSpec(), 2).fit_features(x[:4], [0, 0, 0, 1])


def test_classic_model_predicts_from_uint8_images_like_a_module():
    spec = FeatureSpec(families=["histogram", "dft"], histogram_bins=4, dft_bins=4)
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 100, (10, 3, 24, 24), dtype=np.uint8)
    bright = rng.integers(150, 256, (10, 3, 24, 24), dtype=np.uint8)
    images = torch.from_numpy(np.concatenate([dark, bright]))
    model = ClassicModel(create_model("naive_bayes", num_classes=2), spec, 2, name="naive_bayes")
    model.fit_features(model.features(images), np.repeat([0, 1], 10))
    assert model.eval() is model and model.to("cpu") is model
    logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (20, 2)
    assert (logits.argmax(1).numpy() == np.repeat([0, 1], 10)).all()
    assert model.predict_logits(images[:0]).shape == (0, 2)
    assert len(model.selected_features()) == len(model.extractor) == 2 * 3 * 4 + 4  # k_best="all"
    with pytest.raises(TypeError, match="uint8"):
        model(images.float())


@pytest.mark.parametrize("setting", ["model.weights=/nowhere/cnn.safetensors", "model.freeze_backbone=true"])
def test_cnn_settings_on_a_classical_model_are_refused_not_dropped(setting: str) -> None:
    from leukoscope.engine.config import ConfigError, load_config
    from leukoscope.engine.learner import check_learner_config
    from leukoscope.tasks.classify import preprocessing_of

    config = load_config(overrides=["model.name=svm_rbf", setting])
    with pytest.raises(ConfigError, match="are for CNNs; svm_rbf is a classical model"):
        check_learner_config(config, preprocessing_of(config))


@pytest.mark.parametrize(("option", "home"), [("k_best", "features.k_best"),
                                              ("class_weight", "train.class_weighted_loss"),
                                              ("random_state", "train.seed")])
def test_a_classical_setting_given_as_a_model_option_is_refused(option: str, home: str) -> None:
    """model.options={k_best: 3} fitted 3 features while the bundle's feature_spec said features.k_best 50."""
    from leukoscope.engine.config import ConfigError, load_config
    from leukoscope.engine.learner import check_learner_config
    from leukoscope.tasks.classify import preprocessing_of

    config = load_config(overrides=["model.name=svm_rbf", f"model.options={{{option}: 3}}", "features.k_best=50"])
    with pytest.raises(ConfigError, match=f"model.options.{option} is set by {home}: set {home} instead"):
        check_learner_config(config, preprocessing_of(config))
    # a misspelt option is named before any image is decoded, among the options a config sets there (it offered
    # weights and freeze_backbone, refused next for a classical model)
    config = load_config(overrides=["model.name=svm_rbf", "model.options={gama: 3}"])
    with pytest.raises(ConfigError, match=r"no option 'gama' \(did you mean 'gamma'\?\); its options: C, gamma, cv$"):
        check_learner_config(config, preprocessing_of(config))


def test_a_k_best_above_the_features_computed_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """features.k_best 5000 on a few hundred features became "all" without a word."""
    import leukoscope.engine.learner as learner_module
    from leukoscope.engine.config import load_config
    from leukoscope.engine.learner import create_learner
    from leukoscope.tasks.classify import preprocessing_of

    said: list[str] = []
    monkeypatch.setattr(learner_module, "say", said.append)
    for k_best in (5000, 10):
        config = load_config(overrides=["model.name=svm_rbf", f"features.k_best={k_best}"])
        learner = create_learner(config, ["a", "b"], preprocessing_of(config))
        kept = learner.model_options["k_best"]
        assert (kept == "all") is (k_best == 5000)
    assert len(said) == 1 and said[0].startswith("note: features.k_best 5000 is more than the ")
