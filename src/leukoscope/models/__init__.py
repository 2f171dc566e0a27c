"""Model registry: ``list_models()``, ``create_model(name, num_classes, ...)``."""

from leukoscope.models.registry import create_model, list_models, model_entry, register_model
from leukoscope.models.weights import WeightsError, WithoutHead

__all__ = ["create_model", "list_models", "model_entry", "register_model", "WeightsError", "WithoutHead"]
