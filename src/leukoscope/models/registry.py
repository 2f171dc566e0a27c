"""One registry for every model leukoscope can build, as torchvision's ``get_model``.

A builder is registered under a name with a *kind* (``classifier``, ``detector``,
``classic``); :func:`create_model` builds it from a name and keyword arguments,
:func:`list_models` lists names, optionally of one kind.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    builder: Callable[..., Any]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, kind: str = "classifier", description: str = "") -> Callable:
    """Decorator: register ``builder(num_classes, **kwargs)`` under ``name``."""

    def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        doc = description or next(iter((builder.__doc__ or "").strip().splitlines()), "")
        _REGISTRY[name] = ModelEntry(name, kind, builder, doc)
        return builder

    return decorate


def _ensure_builtin_models_registered(*, classic: bool = True) -> None:
    # Importing the modules runs their @register_model decorators. The classical models come
    # apart: they import scikit-learn (seconds of start-up), which loading a network never needs.
    from leukoscope.models import jabeena, seed_cnns, torchvision_models  # noqa: F401
    from leukoscope.models import detectors  # noqa: F401
    if classic:
        from leukoscope.models import classic as _classic  # noqa: F401


def list_models(kind: str | None = None) -> list[str]:
    _ensure_builtin_models_registered()
    return sorted(name for name, entry in _REGISTRY.items() if kind is None or entry.kind == kind)


def model_entry(name: str) -> ModelEntry:
    _ensure_builtin_models_registered(classic=False)
    if name not in _REGISTRY:
        _ensure_builtin_models_registered()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int, **kwargs: Any) -> Any:
    """Build model ``name`` with ``num_classes`` outputs.

    Common keyword arguments for CNNs: ``weights`` (None, a local weights file, or
    a torchvision weight name such as ``"DEFAULT"``, which needs internet) and
    ``freeze_backbone`` (train the new head only).
    """
    entry = model_entry(name)
    minimum = 1 if entry.kind == "detector" else 2  # a detector's classes exclude the background
    if num_classes < minimum:
        raise ValueError(f"a {entry.kind} needs at least {minimum} classes, got num_classes={num_classes}")
    _check_options(entry, kwargs)
    return entry.builder(num_classes=num_classes, **kwargs)


def model_options(name: str) -> list[str] | None:
    """Keyword arguments the builder of ``name`` accepts (None: any, it takes ``**kwargs``)."""
    parameters = inspect.signature(model_entry(name).builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.name != "num_classes"]


def unknown_option(name: str, options: Iterable[str], offered_without: Iterable[str] = ()) -> str | None:
    """The message for the first of ``options`` the builder of ``name`` does not take (None: it takes them all),
    with a close match among those it takes, less ``offered_without`` (the ones a config sets elsewhere)."""
    accepted = model_options(name)
    if accepted is None:
        return None
    offered = [option for option in accepted if option not in set(offered_without)]
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, offered, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"model {name!r} has no option {key!r}{hint}; its options: {', '.join(offered) or 'none'}"
    return None


def _check_options(entry: ModelEntry, kwargs: dict[str, Any]) -> None:
    message = unknown_option(entry.name, kwargs)
    if message:
        raise ValueError(message)
