"""Settings a network cannot take are refused before any image is decoded (check_learner_config)."""
from __future__ import annotations

import pytest

from leukoscope.engine.config import ConfigError, load_config
from leukoscope.engine.learner import check_learner_config
from leukoscope.tasks.classify import preprocessing_of


def _check(*overrides: str) -> str:
    config = load_config(overrides=list(overrides))
    return check_learner_config(config, preprocessing_of(config))


def test_an_image_size_alexnet_cannot_take_is_refused_with_its_smallest() -> None:
    # alexnet's three max-pools shrank 32-62 px to nothing: a raw RuntimeError after the earlier runs of a
    # grid search had trained, and their table lost
    with pytest.raises(ConfigError, match=r"alexnet cannot take images of 48 px \(model.image_size\).* at least 63 px"):
        _check("model.name=alexnet", "model.image_size=48")
    assert _check("model.name=alexnet", "model.image_size=63") == "classifier"
    assert _check("model.name=vgg19", "model.image_size=32") == "classifier"  # five pools: 32 px is 1 x 1, enough


def test_a_frozen_backbone_without_trained_weights_is_refused() -> None:
    # it trained a class layer on a frozen random network, without a word
    with pytest.raises(ConfigError, match="without model.weights or model.init they are random"):
        _check("model.name=mobilenet_v2", "model.image_size=64", "model.freeze_backbone=true")
    assert _check("model.name=mobilenet_v2", "model.image_size=64") == "classifier"


@pytest.mark.parametrize("options", ["{dropout: ten}", "{dropout: [0.1]}", "{dropout: null}"])
def test_a_model_option_of_the_wrong_type_is_refused_before_any_image_is_decoded(options: str) -> None:
    # it was a TypeError traceback from nn.Dropout, after the split had been made
    with pytest.raises(ConfigError, match=r"^model\.options\.dropout: expected a number, got "):
        _check("model.name=abas_cnn", "model.image_size=32", f"model.options={options}")
    assert _check("model.name=abas_cnn", "model.image_size=32", "model.options={dropout: 0.3}") == "classifier"
