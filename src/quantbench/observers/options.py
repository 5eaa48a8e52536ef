"""Declared observer options (one pydantic model per observer) and :func:`validate_observer_options`.

Each observer class names its options model in ``Options`` (default: no options). A config, a sweep or
the CLI calls ``validate_observer_options(name, options)`` when it is built, so a bad option is a one-line
:class:`ObserverOptionError` naming the observer, the key and value, and the allowed options, instead of
a traceback once calibration starts. :func:`quantbench.observers.build_observer` checks the same way.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError

from quantbench.errors import ConfigError


class ObserverOptionError(ConfigError):
    """An observer option with a bad value (or an unknown one)."""


class UnknownObserverOptionError(ObserverOptionError, TypeError):
    """An option the observer does not take (also a ``TypeError``, as an unexpected keyword is)."""


def _even_bins(v: int) -> int:
    if v < 2 or v % 2:
        raise ValueError("must be an even integer >= 2")
    return v


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be finite")
    return v


Bins = Annotated[StrictInt, AfterValidator(_even_bins), Field(description="histogram bins, even, >= 2")]
Momentum = Annotated[float, Field(ge=0.0, lt=1.0, description="EMA momentum in [0, 1)")]
PositiveFloat = Annotated[float, Field(gt=0.0), AfterValidator(_finite)]


class NoOptions(BaseModel):
    """Base of every observer's options model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EMAMinMaxOptions(NoOptions):
    momentum: Momentum = 0.9


class BinsOptions(NoOptions):
    bins: Bins = 2048


class QuantileOptions(BinsOptions):
    alpha: Annotated[float, Field(ge=0.5, le=1.0, description="quantile in [0.5, 1]")] = 0.9999


class MSEOptions(BinsOptions):
    num_candidates: Annotated[StrictInt, Field(ge=1, description="candidate ranges, >= 1")] = 100


class NormOptions(NoOptions):
    p: Annotated[PositiveFloat, Field(description="norm order, > 0")] = 2.0


class MeanStdOptions(NoOptions):
    alpha: Annotated[PositiveFloat, Field(description="standard deviations, > 0")] = 3.0


class EMAMSEOptions(MSEOptions):
    momentum: Momentum = 0.9


class EMAQuantileOptions(BinsOptions):
    momentum: Momentum = 0.9
    alpha: Annotated[float, Field(ge=0.5, le=1.0, description="quantile in [0.5, 1]")] = 0.99999


class ClipStdOptions(NoOptions):
    std_scale: Annotated[PositiveFloat, Field(description="standard deviations, > 0")] = 2.6


def describe_options(model: type[BaseModel]) -> str:
    """``"alpha (quantile in [0.5, 1], default 0.9999), bins (...)"`` or ``"none"``."""
    parts = []
    for key, field in model.model_fields.items():
        desc = field.description or (field.annotation.__name__ if isinstance(field.annotation, type) else "")
        parts.append(f"{key} ({desc + ', ' if desc else ''}default {field.default!r})")
    return ", ".join(parts) or "none"


def validate_observer_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Check ``options`` against observer ``name``'s declared options; return them validated (only the
    keys given, coerced to the declared types). Raises ``UnknownNameError`` for an unknown observer and
    :class:`ObserverOptionError` (one line: observer, key, value, allowed options) for a bad option."""
    from quantbench.observers.base import OBSERVERS

    cls = OBSERVERS.get(name)
    model: type[BaseModel] = getattr(cls, "Options", NoOptions)
    options = dict(options or {})
    allowed = describe_options(model)
    unknown = sorted(k for k in options if k not in model.model_fields)
    if unknown:
        given = ", ".join(f"{k}={options[k]!r}" for k in unknown)
        raise UnknownObserverOptionError(
            f"observer {name!r}: unknown option {given}; allowed options: {allowed}"
        )
    try:
        parsed = model(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        msg = err["msg"].removeprefix("Value error, ")
        raise ObserverOptionError(
            f"observer {name!r}: option {key}={options.get(key)!r} is invalid ({msg}); allowed options: {allowed}"
        ) from None
    return {k: getattr(parsed, k) for k in options}
