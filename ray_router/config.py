"""One way to declare and validate a configuration: strict, frozen pydantic models and dataclasses.

Every configuration of ray-router (policies, weightings, CCFT, the sweep spec, the Serve app's
arguments) is declared with :class:`StrictModel` or :func:`config_dataclass`: types are checked
strictly (``"1"`` is not a float, ``True`` is not an int; an int is a float), unknown fields are
refused, and instances are immutable. Range checks are ``Field``/``annotated_types`` constraints or
validators on the class itself, never hand-written checks elsewhere.

:func:`parse` is the one place where pydantic's ``ValidationError`` becomes a :class:`ConfigError`
naming the field path, e.g. ``fgts_cdb config: eta: Input should be a valid number``; constructing a
config directly raises ``pydantic.ValidationError`` (a ``ValueError``), which :func:`as_config_error`
converts at the edges (CLI, HTTP, sweep files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass
from typing_extensions import dataclass_transform

from ray_router.errors import ConfigError

T = TypeVar("T")

STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, validate_default=True)
_DATACLASS = ConfigDict(strict=True, extra="forbid", validate_default=True)  # frozen: the decorator's


class StrictModel(BaseModel):
    """Base of the configuration models: strict types, unknown fields refused, immutable."""

    model_config = STRICT


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def config_dataclass(cls: type[T]) -> type[T]:
    """A frozen pydantic dataclass with :data:`STRICT` validation (``dataclasses.fields`` and
    ``dataclasses.replace`` keep working; ``replace`` validates the new values too)."""
    return _pydantic_dataclass(frozen=True, config=_DATACLASS)(cls)  # type: ignore[return-value]


def format_validation_error(e: ValidationError, where: str = "") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        msg = str(err.get("msg", "invalid"))
        parts.append(f"{loc}: {msg}" if loc else msg)
    prefix = f"{where}: " if where else ""
    return prefix + "; ".join(parts)


def as_config_error(e: ValidationError, where: str = "") -> ConfigError:
    return ConfigError(format_validation_error(e, where))


def parse(cls: type[T], values: Mapping[str, Any] | None = None, where: str = "", strict: bool = True) -> T:
    """An instance of the config class ``cls`` (a :class:`StrictModel` or a :func:`config_dataclass`)
    from ``values``; a :class:`ConfigError` naming the field path otherwise.

    ``strict=False`` coerces (``"0.5"`` → 0.5): for values typed as text, e.g. ``--set key=value``."""
    try:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            return cls.model_validate(dict(values or {}), strict=strict)
        if strict:
            names = set(field_names(cls))
            unknown = sorted(set(values or {}) - names)
            if unknown:
                raise ConfigError(f"{where or cls.__name__}: unknown field(s) {unknown}; fields: {sorted(names)}")
            return cls(**dict(values or {}))
        return TypeAdapter(cls).validate_python(dict(values or {}), strict=False)
    except ValidationError as e:
        raise as_config_error(e, where or getattr(cls, "__name__", "config")) from None
    except TypeError as e:  # a non-mapping where a mapping was expected
        raise ConfigError(f"{where or getattr(cls, '__name__', 'config')}: {e}") from None


def replace(obj: T, where: str = "", **changes: Any) -> T:
    """``dataclasses.replace`` / ``model_copy(update=...)`` with validation, errors as ConfigError."""
    try:
        if isinstance(obj, BaseModel):
            return type(obj).model_validate({**obj.model_dump(), **changes})
        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    except ValidationError as e:
        raise as_config_error(e, where or type(obj).__name__) from None


def field_names(cls: type) -> tuple[str, ...]:
    """The field names of a config class (model or dataclass)."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return tuple(cls.model_fields)
    return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def checked(where: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: a function that builds a config raises ConfigError (named ``where``) on bad values."""

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        def wrapper(*a: Any, **kw: Any) -> T:
            try:
                return fn(*a, **kw)
            except ValidationError as e:
                raise as_config_error(e, where) from None

        wrapper.__name__ = getattr(fn, "__name__", "wrapper")
        wrapper.__doc__ = fn.__doc__
        return wrapper

    return deco
