"""The ``adaround``, ``brecq`` and ``qdrop`` method kinds: calibrate like ``ptq``, then reconstruct.

``{kind: qdrop, iters: 200, recon_size: 1024, drop_prob: 0.5, recon_options: {round_weight: 0.1}}``; every
``ptq`` key (calibrators, calib_size, bn_calib, ...) is accepted too. ``recon_options`` holds any other field
of :class:`quantbench.recon.config.ReconOptions` and is validated when the sweep is loaded.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model, field_validator

from quantbench.config import field_from
from quantbench.recon.config import RECON_METHODS, ReconOptions
from quantbench.sweep.methods.base import MethodParams, register_method
from quantbench.sweep.methods.ptq import PTQMethod, PTQParams

_OWN = ("iters", "recon_size", "drop_prob", "recon_options")


class ReconParams(PTQParams):
    """The ``ptq`` parameters plus reconstruction's (the ``kind`` is the method's name)."""

    kind: str  # type: ignore[assignment]
    iters: int | None = field_from(ReconOptions, "iters")
    recon_size: int = field_from(ReconOptions, "recon_size")
    drop_prob: float = field_from(ReconOptions, "drop_prob")
    recon_options: dict[str, Any] = Field(default_factory=dict, description="other ReconOptions fields")

    @field_validator("recon_options")
    @classmethod
    def _known_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(v) & set(_OWN))
        if clash:
            raise ValueError(f"give {', '.join(clash)} as method keys, not inside recon_options")
        ReconOptions.model_validate(v)  # an unknown or out-of-range option is named here
        return v

    def recon(self) -> dict[str, Any]:
        return {"iters": self.iters, "recon_size": self.recon_size, "drop_prob": self.drop_prob,
                **self.recon_options}

    def default_label(self) -> str:
        return f"{self.kind}:{super().default_label()}"


class ReconMethodKind(PTQMethod):
    """PTQ followed by a reconstruction method (the run's ``PTQConfig.method``)."""

    def config_fields(self, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, ReconParams)
        out = {k: v for k, v in super().config_fields(params).items() if k not in _OWN}
        out.update(method=self.name, recon=params.recon())
        return out


for _name in RECON_METHODS.names():
    _params = create_model(f"{_name.title()}Params", __base__=ReconParams,
                           kind=(Literal[_name], _name))  # type: ignore[call-overload]
    register_method(type(f"{_name.title()}Method", (ReconMethodKind,), {
        "name": _name, "params_type": _params, "description": RECON_METHODS.get(_name).description}))
