"""Per-layer overrides of a backend spec, as data (torch.ao's ``QConfigMapping`` idea).

An override matches conv/linear layers by module name glob (``fnmatch`` on the module's name in the
model, e.g. ``layer3.*``), by module type (``type:Conv2d``, ``type:Linear``) or ``depthwise`` (convs
with ``groups == in_channels > 1``), and refines what the backend spec says for them: weight and
activation bits, scheme fields, observers, or ``keep_float``. ``quantizer:GLOB`` matches activation
quantizers by name instead (``quantbench ptq --list-quantizers`` prints the names, e.g. ``add_3_post``) and
sets only activation fields; it applies after the layer-based resolution below, so it can set a tensor
that several layers, adds or concats read (what a learned mixed-precision allocation writes).

Precedence: entries apply in order, field by field; a later entry that sets a field replaces what an
earlier one set for that field. The backend's ``first_last`` policy comes first, then the spec's
``overrides:``, then the overrides given to :func:`quantbench.graph.quantize.prepare`. An entry that
sets bits, a scheme field or an observer quantizes its layers (``keep_float: false``) unless it says
``keep_float: true`` itself.

Activation settings of an override apply to the activation quantizer(s) the matched layer reads (its
input). A quantizer read by several layers with different settings takes the highest precision among
its readers (most bits; on a tie the backend's own setting, else the first reader in graph order);
readers that are not conv/linear layers (adds, concats) count with the backend's setting. A quantizer
whose readers are all kept in float is not inserted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from quantbench.errors import ConfigError
from quantbench.quant.scheme import Granularity, QScheme, ScaleType, Signedness

TYPE_PREFIX = "type:"
QUANTIZER_PREFIX = "quantizer:"
DEPTHWISE = "depthwise"


class SchemeUpdate(BaseModel):
    """Fields of a :class:`QScheme` to change; unset fields keep the backend's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int | None = Field(None, ge=1, le=16)
    symmetric: bool | None = None
    signedness: Signedness | None = None
    granularity: Granularity | None = None
    ch_axis: int | None = None
    scale_type: ScaleType | None = None
    narrow_range: bool | None = None

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class LayerOverride(BaseModel):
    """One entry of ``overrides:``: which layers it matches and what it sets for them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str = Field(description="module name glob ('layer3.*'), 'type:Conv2d', 'type:Linear', 'depthwise' or "
                                   "'quantizer:GLOB' (activation quantizers by name)")
    w_bits: int | None = Field(None, ge=1, le=16, description="weight bits (shorthand for weight.bits)")
    a_bits: int | None = Field(None, ge=1, le=16, description="bits of the layer's input activations")
    weight: SchemeUpdate | None = None
    activation: SchemeUpdate | None = None
    w_observer: str | None = None
    a_observer: str | None = None
    w_observer_options: dict[str, Any] | None = None
    a_observer_options: dict[str, Any] | None = None
    keep_float: bool | None = Field(None, description="keep the layer (weights and input) in float")

    @field_validator("match")
    @classmethod
    def _match(cls, v: str) -> str:
        v = v.strip()
        if not v or v in (TYPE_PREFIX, QUANTIZER_PREFIX):
            raise ValueError("match must be a module name glob, 'type:NAME', 'depthwise' or 'quantizer:GLOB'")
        return v

    @field_validator("w_observer", "a_observer")
    @classmethod
    def _observer_known(cls, v: str | None) -> str | None:
        if v is not None:
            from quantbench.observers import OBSERVERS

            if v not in OBSERVERS.names():
                raise ValueError(f"unknown observer {v!r}; valid observers: {', '.join(OBSERVERS.names())}")
        return v

    @model_validator(mode="after")
    def _check(self) -> LayerOverride:
        sets_quant = bool(self._weight_changes() or self._activation_changes() or self.w_observer
                          or self.a_observer or self.w_observer_options or self.a_observer_options)
        if self.targets_quantizer and (self.keep_float is not None or self._weight_changes() or self.w_observer
                                       or self.w_observer_options):
            raise ValueError(f"override {self.match!r} names activation quantizers: it can set only a_bits, "
                             "activation, a_observer and a_observer_options")
        if self.keep_float and sets_quant:
            raise ValueError(f"override {self.match!r}: keep_float: true cannot be combined with bits, "
                             "schemes or observers")
        if self.keep_float is None and not sets_quant:
            raise ValueError(f"override {self.match!r} sets nothing: give w_bits, a_bits, weight, activation, "
                             "an observer or keep_float")
        for which, b, upd in (("weight", self.w_bits, self.weight), ("activation", self.a_bits, self.activation)):
            if b is not None and upd is not None and upd.bits is not None and upd.bits != b:
                raise ValueError(f"override {self.match!r}: {which}.bits {upd.bits} contradicts "
                                 f"{which[0]}_bits {b}")
        return self  # keep_float None here: the entry quantizes its layers (documented precedence)

    def _weight_changes(self) -> dict[str, Any]:
        out = self.weight.changes() if self.weight else {}
        if self.w_bits is not None:
            out["bits"] = self.w_bits
        return out

    def _activation_changes(self) -> dict[str, Any]:
        out = self.activation.changes() if self.activation else {}
        if self.a_bits is not None:
            out["bits"] = self.a_bits
        return out

    @property
    def targets_quantizer(self) -> bool:
        """Whether this entry names activation quantizers (``quantizer:GLOB``) rather than layers."""
        return self.match.startswith(QUANTIZER_PREFIX)

    def matches_quantizer(self, name: str) -> bool:
        """Whether this ``quantizer:GLOB`` entry applies to the activation quantizer ``name``."""
        return self.targets_quantizer and fnmatchcase(name, self.match[len(QUANTIZER_PREFIX):])

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether this entry applies to the layer ``name`` (its module name in the model)."""
        if self.targets_quantizer:
            return False
        if self.match.startswith(TYPE_PREFIX):
            return type(module).__name__ == self.match[len(TYPE_PREFIX):]
        if self.match == DEPTHWISE:
            return is_depthwise(module)
        return fnmatchcase(name, self.match)


def is_depthwise(module: nn.Module) -> bool:
    """A grouped conv with one group per input channel."""
    groups = getattr(module, "groups", 1)
    return isinstance(module, nn.modules.conv._ConvNd) and groups > 1 and groups == module.in_channels


def apply_scheme(base: QScheme, changes: Mapping[str, Any], where: str) -> QScheme:
    """``base`` with ``changes`` applied, validated (ConfigError naming ``where`` otherwise)."""
    if not changes:
        return base
    try:
        return QScheme.model_validate({**base.model_dump(), **changes})
    except ValidationError as exc:
        msgs = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(f"{where}: invalid scheme {dict(changes)}: {msgs}") from None


@dataclass(frozen=True)
class Side:
    """How one tensor class (weights, or a layer's input activations) of one layer is quantized."""

    scheme: QScheme
    observer: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerSettings:
    """A layer's resolved settings: ``None`` sides mean kept in float."""

    name: str
    type: str
    weight: Side | None
    activation: Side | None
    matched: tuple[str, ...] = ()  # the patterns of the entries that applied, in order

    @property
    def keep_float(self) -> bool:
        return self.weight is None


def _observer_side(base: Side, scheme: QScheme, observer: str | None, options: dict[str, Any] | None) -> Side:
    obs = observer or base.observer
    # options belong to an observer: the backend's options only go with the backend's observer
    opts = dict(options) if options is not None else dict(base.options) if obs == base.observer else {}
    return Side(scheme, obs, opts)


def resolve_layers(layers: Sequence[tuple[str, nn.Module]], overrides: Iterable[LayerOverride],
                   weight: Side, activation: Side) -> dict[str, LayerSettings]:
    """Settings of every layer (module name -> settings) after applying ``overrides`` in order.

    A pattern that matches no layer is a ConfigError naming it and listing the layers.
    """
    overrides = [o for o in overrides if not o.targets_quantizer]  # applied per quantizer: quantizer_side()
    names = [n for n, _ in layers]
    for o in overrides:
        if not any(o.matches(n, m) for n, m in layers):
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} layers)" if len(names) > 12 else "")
            raise ConfigError(f"override pattern {o.match!r} matches no conv/linear layer; layers: {shown} "
                              "(or use type:Conv2d, type:Linear, depthwise)")
    out: dict[str, LayerSettings] = {}
    for name, module in layers:
        w_changes: dict[str, Any] = {}
        a_changes: dict[str, Any] = {}
        w_obs = a_obs = None
        w_opts: dict[str, Any] | None = None
        a_opts: dict[str, Any] | None = None
        keep_float = False
        matched = []
        for o in overrides:
            if not o.matches(name, module):
                continue
            matched.append(o.match)
            keep_float = bool(o.keep_float)
            w_changes.update(o._weight_changes())
            a_changes.update(o._activation_changes())
            w_obs, a_obs = o.w_observer or w_obs, o.a_observer or a_obs
            w_opts = o.w_observer_options if o.w_observer_options is not None else w_opts
            a_opts = o.a_observer_options if o.a_observer_options is not None else a_opts
        where = f"override of layer {name} ({', '.join(matched)})"
        w = a = None
        if not keep_float:
            w = _observer_side(weight, apply_scheme(weight.scheme, w_changes, where), w_obs, w_opts)
            a = _observer_side(activation, apply_scheme(activation.scheme, a_changes, where), a_obs, a_opts)
        out[name] = LayerSettings(name, type(module).__name__, w, a, tuple(matched))
    return out


def shared_activation(readers: Sequence[Side | None], base: Side) -> tuple[Side | None, bool]:
    """The settings of an activation quantizer read by ``readers`` (None: a reader kept in float).

    Returns (side, conflict): side is None when every reader is kept in float; otherwise the reader
    with the most bits (ties: the backend's setting, else the first reader). ``conflict`` says that
    the readers asked for different settings.
    """
    live = [r for r in readers if r is not None]
    if readers and not live:
        return None, False
    if not live:
        return base, False
    distinct = {(r.scheme, r.observer, repr(sorted(r.options.items()))) for r in live}
    top = max(r.scheme.bits for r in live)
    best = [r for r in live if r.scheme.bits == top]
    chosen = base if base in best else best[0]
    return chosen, len(distinct) > 1


def quantizer_side(name: str, side: Side, overrides: Iterable[LayerOverride], where: str) -> tuple[Side, list[str]]:
    """``side`` refined by the ``quantizer:GLOB`` entries matching the activation quantizer ``name`` (in order,
    field by field); also the patterns that matched."""
    matched = [o for o in overrides if o.matches_quantizer(name)]
    if not matched:
        return side, []
    changes: dict[str, Any] = {}
    obs, opts = None, None
    for o in matched:
        changes.update(o._activation_changes())
        obs = o.a_observer or obs
        opts = o.a_observer_options if o.a_observer_options is not None else opts
    pats = [o.match for o in matched]
    scheme = apply_scheme(side.scheme, changes, f"{where} ({', '.join(pats)})")
    return _observer_side(side, scheme, obs, opts), pats


FirstLastPolicy = Literal["same", "fp"] | int


def first_last_overrides(first: str, last: str, policy: FirstLastPolicy) -> list[LayerOverride]:
    """The first/last-layer policy as overrides of the first and last conv/linear layer."""
    if policy == "same":
        return []
    fields: dict[str, Any] = {"keep_float": True} if policy == "fp" else {"w_bits": policy, "a_bits": policy}
    return [LayerOverride(match=_exact(n), **fields) for n in dict.fromkeys((first, last))]


def _exact(name: str) -> str:
    """A glob matching exactly ``name`` (module names hold no glob characters, but escape them anyway)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
