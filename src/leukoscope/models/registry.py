"""One registry for every model leukoscope can build, as torchvision's ``get_model``.

A builder is registered under a name with a *kind* (``classifier``, ``detector``,
``classic``); :func:`create_model` builds it from a name and keyword arguments,
:func:`list_models` lists names, optionally of one kind.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
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
    message = unknown_option(entry.name, kwargs) or wrong_option_type(entry.name, kwargs)
    if message:
        raise ValueError(message)


def wrong_option_type(name: str, options: dict[str, Any]) -> str | None:
    """The message for the first of ``options`` whose value is not of the type the builder of ``name`` declares
    (None: all are, or their types are not checked here): ``{dropout: ten}`` reached ``nn.Dropout`` and ended in
    a TypeError traceback. Types are the builder's annotations, else its default's type."""
    expected = _option_types(model_entry(name).builder)
    for key, value in options.items():
        kind = expected.get(key)
        if kind is None or _matches(value, kind) is not False:
            continue
        hint = ""
        if isinstance(value, str) and _is_number(value):  # YAML 1.1 reads 1e-3 (no dot) as text
            hint = f" (YAML read {value} as text: write it with a dot, e.g. {float(value)!r})"
        shown = "null" if value is None else repr(value)
        return f"model.options.{key}: expected {_describe_type(kind)}, got {shown}{hint}"
    return None


def _option_types(builder: Callable[..., Any]) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved: the defaults' types tell
        hints = {}
    types = {}
    for parameter in inspect.signature(builder).parameters.values():
        if parameter.name in hints:
            types[parameter.name] = hints[parameter.name]
        elif parameter.default not in (inspect.Parameter.empty, None):
            types[parameter.name] = type(parameter.default)
    return types


def _matches(value: Any, kind: Any) -> bool | None:
    """Whether ``value`` is of type ``kind`` (None: a type not checked here, such as a path or Any)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        answers = [_matches(value, arg) for arg in args]
        return True if True in answers else None if None in answers else False
    if origin is typing.Literal:
        return value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args))
    if origin in (collections.abc.Sequence, list) or (origin is tuple and args[-1:] == (...,)):
        if not isinstance(value, (list, tuple)):
            return False
        answers = [_matches(item, args[0]) if args else None for item in value]
        return False if False in answers else None if None in answers else True
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):  # true/false is no number; a whole number is a float too
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return None


def _describe_type(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (collections.abc.Sequence, list, tuple):
        return f"a list whose items are each {_describe_type(args[0])}" if args else "a list"
    names = {type(None): "null", bool: "true or false", int: "a whole number", float: "a number", str: "a text"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
