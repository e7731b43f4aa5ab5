"""The one cattrs converter: wire data (JSON, config.json) to and from attrs models.

Models stay free of wire concerns; this module owns them. Structuring is strict about
primitive types (``"8070"`` is not a port, ``1`` is not a string, ``true`` is not a number)
and turns cattrs' exception groups into one readable message naming the first bad field,
``"server.port: must be between 1 and 65535"``, which routes answer as a 400 and the
config loader as a one-line error.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import cattrs
import cattrs.cols
from cattrs.dispatch import StructureHook
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn

from .errors import ValidationError

__all__ = [
    "STRUCTURE_ERRORS",
    "FieldError",
    "converter",
    "describe_error",
    "describe_errors",
    "field_check",
    "json_body",
    "object_structure_fn",
    "structure",
    "unstructure",
    "valid_text",
]

T = TypeVar("T")


class FieldError(ValueError):
    """Raised by a model's validator; ``name`` is the attribute it judged."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def field_check(
    predicate: Callable[[Any], bool], message: str
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator whose failure the converter reports as ``<field>: <message>``."""

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not predicate(value):
            raise FieldError(attribute.name, message)

    return check


def _strict(kind: type, message: str) -> Callable[[Any, type], Any]:
    def structure_primitive(value: Any, _type: type) -> Any:
        # bool is an int subclass; a JSON true is never a number here.
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(message)
        if kind is float and isinstance(value, int):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise ValueError("must be a finite number") from None
        if not isinstance(value, kind):
            raise TypeError(message)
        return value

    return structure_primitive


def valid_text(value: str) -> bool:
    """Text every layer below can carry: no lone surrogate (not encodable as UTF-8: it
    breaks the store, Docker's JSON and the container's stdin) and no NUL (cuts C
    strings: environment, argv, paths)."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _structure_text(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    if not valid_text(value):
        raise ValueError("invalid text")
    return value


def _structure_float(value: Any, _type: type) -> float:
    # json.loads reads NaN, Infinity and 1e400 (as inf): none is a usable number.
    number: float = _strict(float, "must be a number")(value, _type)
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


#: What structuring bad data can raise (cattrs' groups, and bare errors without detail).
STRUCTURE_ERRORS = (
    cattrs.BaseValidationError,
    cattrs.errors.StructureHandlerNotFoundError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
)

converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
converter.register_structure_hook(str, _structure_text)
converter.register_structure_hook(int, _strict(int, "must be an integer"))
converter.register_structure_hook(float, _structure_float)
converter.register_structure_hook(bool, _strict(bool, "must be true or false"))


def _is_sequence(type_: Any) -> bool:
    origin = typing.get_origin(type_)
    args = typing.get_args(type_)
    return origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis)


def _sequence_factory(type_: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """Lists and ``tuple[X, ...]`` come from JSON arrays only (a string is not a list)."""
    inner: StructureHook
    if typing.get_origin(type_) is list:
        inner = cattrs.cols.list_structure_factory(type_, conv)
    else:
        inner = cattrs.cols.homogenous_tuple_structure_factory(type_, conv)

    def structure_sequence(value: Any, cl: Any) -> Any:
        if not isinstance(value, list):
            raise TypeError("must be a list")
        return inner(value, cl)

    return structure_sequence


converter.register_structure_hook_factory(_is_sequence, _sequence_factory)


def object_structure_fn(cls: type[T], **overrides: Any) -> Callable[[Any, Any], T]:
    """Structure an attrs class from a JSON object only (cattrs alone accepts any mapping-
    like value, even a list); ``overrides`` are cattrs ``override(...)`` per field."""
    inner = make_dict_structure_fn(cls, converter, **overrides)

    def structure_object(value: Any, cl: Any) -> T:
        if not isinstance(value, dict):
            raise TypeError("must be an object")
        return inner(value, cl)

    return structure_object


converter.register_structure_hook_factory(attrs.has, lambda cls: object_structure_fn(cls))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FieldError):
        return exc.message
    if isinstance(exc, KeyError):
        return "is required"
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown keys: {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, TypeError | ValueError) and str(exc).startswith("must "):
        return str(exc)
    if isinstance(exc, AttributeError | TypeError):
        return "has the wrong type"
    return str(exc) or "is invalid"


def _walk(exc: BaseException, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _walk(sub, f"{path}.{note.name}" if path else note.name)
        for sub in without:
            yield from _walk(sub, path)
    elif isinstance(exc, IterableValidationError):
        with_indexes, rest = exc.group_exceptions()
        for sub, index_note in with_indexes:
            yield from _walk(sub, f"{path}[{index_note.index!r}]")
        for sub in rest:
            yield from _walk(sub, path)
    elif isinstance(exc, FieldError):
        yield (f"{path}.{exc.name}" if path else exc.name), exc.message
    else:
        yield path, _describe(exc)


def describe_error(exc: BaseException, root: str = "") -> tuple[str, str]:
    """The first bad field of a structuring error, as ``(dotted path, what is wrong)``."""
    for path, message in _walk(exc, root):
        return path, message
    return root, "is invalid"


def describe_errors(exc: BaseException, root: str = "") -> list[tuple[str, str]]:
    """Every bad field of a structuring error (``lightd config check`` lists them all)."""
    return list(_walk(exc, root)) or [(root, "is invalid")]


def structure(data: Any, cls: type[T], *, root: str = "") -> T:
    """Structure wire data into ``cls``; a bad field raises ``ValidationError`` (a 400)."""
    if attrs.has(cls) and not isinstance(data, dict):
        raise ValidationError(
            f"{root}: must be an object" if root else "Body must be a JSON object"
        )
    try:
        return converter.structure(data, cls)
    except STRUCTURE_ERRORS as exc:
        # The message names the first bad field (the contract's form); ``details`` lists
        # every one cattrs found, so a client fixes them all in one round.
        problems = [f"{path}: {message}" if path else message for path, message in _walk(exc, root)]
        path, message = describe_error(exc, root)
        first = f"{path}: {message}" if path else message
        raise ValidationError(first, details=problems or [first]) from None


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)


def json_body(value: Any) -> bytes:
    """``value`` as Quart's JSON provider writes it (compact, ASCII, a final newline)."""
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"
