"""A backend is data: a validated spec read from one YAML file (seed 001 E and G, seed 004 Fig. 1)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantbench.backends.overrides import LayerOverride, apply_scheme
from quantbench.errors import ConfigError
from quantbench.quant.scheme import QScheme

FirstLast = Literal["same", "fp"] | int
#: the weight axes every quantized layer kind supports: conv1d/conv2d/linear weights all keep output channels on
#: axis 0, which BN folding, per-channel scales and ONNX's per-axis QuantizeLinear rely on
WEIGHT_CH_AXES: tuple[int, ...] = (0,)
Arithmetic = Literal["fake_quant", "onnxruntime", "torch-x86", "torch-qnnpack"]


class Placement(BaseModel):
    """Where activation quantizers go.

    ``inputs``: only the inputs of conv/linear layers are quantized (academic, ACL: the rest runs in
    FP32). ``outputs``: every op's output is re-quantized (TensorRT, SNPE, TVM, FBGEMM, ONNX Runtime):
    conv/linear (fused with a following BN and activation), adds, pooling and other compute ops; the
    inputs of a concat share one quantizer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["inputs", "outputs"]
    add_output: bool = Field(True, description="residual: re-quantize the output of residual adds")
    add_inputs: bool = Field(True, description="skip: re-quantize the branches entering an add "
                                               "(seed 001 Fig. 16 graph 3; false = graph 2)")
    pool: bool = Field(True, description="re-quantize pooling outputs")
    concat_shared: bool = Field(True, description="concat inputs share one quantizer")
    other_ops: bool = Field(True, description="re-quantize outputs of other compute ops (mul, standalone BN)")


class BackendSpec(BaseModel):
    """Everything that makes a simulation faithful to one inference backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    weight: QScheme
    activation: QScheme
    placement: Placement
    fold_bn: bool
    first_last: FirstLast = Field("same", description="'same', 'fp' (kept in float) or a bit-width")
    deployable: bool = True
    not_deployable_because: str = Field("", description="why no integer runtime runs this setting")
    arithmetic: Arithmetic = Field(
        "fake_quant",
        description="inference arithmetic of the simulation: 'fake_quant' (float fake quantization) or "
                    "'onnxruntime' (ONNX Runtime's CPU integer kernels: int32 bias, integer accumulation, "
                    "float32 requantization, QLinearAdd / QLinearGlobalAveragePool; see graph/requant.py) or "
                    "'torch-x86' / 'torch-qnnpack' (PyTorch's x86 / QNNPACK engine: torch.ops.quantized's "
                    "convolution, add and average pool)",
    )
    reduce_range: bool = Field(
        False, description="7-bit weights (ONNX Runtime's reduce_range): no int16 overflow in the u8 x s8 "
                           "kernels of x86 CPUs without VNNI (AVX2)")
    artefacts: tuple[str, ...] = Field((), description="artefact files `quantbench export` writes "
                                 "beside the ONNX (see quantbench.deploy.artefacts)")
    binary_weights: bool = Field(
        False, description="1-bit signed weights are binary, {-1, +1}·s per filter (seed 003 eq. 4), as a "
                           "binary-capable QAT rule (binary, gaussian) learns them; set by the run, never by a spec "
                           "file. Without it 1-bit signed symmetric weights are refused (their grid {-1, 0}·s zeroes "
                           "positive weights)")
    reference: str = ""
    faithful_to: dict[str, str] = Field(
        default_factory=dict, description="real runtimes (quantbench.deploy.runtimes) whose results this simulation "
                                          "reproduces, and how closely, as measured (docs/DEPLOYMENT.md)")
    overrides: tuple[LayerOverride, ...] = Field(
        (), description="per-layer refinements, later entries win (see quantbench.backends.overrides)")

    @model_validator(mode="after")
    def _check(self) -> BackendSpec:
        if isinstance(self.first_last, int) and not 1 <= self.first_last <= 16:
            raise ValueError(f"first_last bits must be in 1..16, got {self.first_last}")
        if not self.deployable and not self.not_deployable_because:
            raise ValueError("a backend with deployable: false must say why in not_deployable_because")
        self._check_schemes(self.weight, self.activation, "")
        for o in self.overrides:  # every scheme an override can produce on its own is checked up front
            where = f"override {o.match!r}"
            try:
                w = apply_scheme(self.weight, o._weight_changes(), where)
                a = apply_scheme(self.activation, o._activation_changes(), where)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            self._check_schemes(w, a, f"{where}: ")
        return self

    def _check_schemes(self, weight: QScheme, activation: QScheme, where: str) -> None:
        if weight.signedness == "adaptive" and self.deployable:
            raise ValueError(f"{where}adaptive signedness is an academic setting: a deployable backend cannot use it")
        for role, scheme in (("weight", weight), ("activation", activation)):
            if role == "weight" and self.binary_weights:
                continue
            if scheme.bits == 1 and scheme.symmetric and scheme.signedness != "unsigned":
                raise ValueError(
                    f"{where}{role}.bits 1: {self.name}'s signed symmetric {role}s at 1 bit have the grid {{-1, 0}}·s, "
                    f"which zeroes every positive {role}: use at least 2 bits (binary or ternary weights: "
                    "`quantbench qat --algorithm binary` or `gaussian` make 1-bit weights binary, {-1, +1}·s)")
        if weight.ch_axis not in WEIGHT_CH_AXES:
            raise ValueError(
                f"{where}weight.ch_axis {weight.ch_axis}: conv and linear weights (out_channels, in_channels, ...) "
                f"are quantized per output channel, so the allowed values are {', '.join(map(str, WEIGHT_CH_AXES))}")
        if activation.per_channel and activation.ch_axis != 1:
            raise ValueError(f"{where}per-channel activations must use ch_axis 1 (NCHW channels)")
        if self.reduce_range and weight.bits > 7:
            raise ValueError(f"{where}reduce_range means weights of at most 7 bits; "
                             "configure(reduce_range=True) sets them")

    def configure(
        self,
        w_bits: int | None = None,
        a_bits: int | None = None,
        first_last: FirstLast | None = None,
        residual: Literal["quantized", "fp"] | None = None,
        skip: Literal["quantized", "fp"] | None = None,
        reduce_range: bool | None = None,
        overrides: tuple[LayerOverride, ...] | list[LayerOverride] = (),
        binary_weights: bool | None = None,
    ) -> BackendSpec:
        """A validated copy with the options every backend accepts applied.

        ``reduce_range=True`` caps the weight bits at 7 (ONNX Runtime's reduce_range); a first/last
        layer given its own bit-width keeps it. ``overrides`` are appended to the spec's own (they win).
        """
        data = self.model_dump()
        data["overrides"] = [*self.overrides, *overrides]
        if w_bits is not None:
            data["weight"]["bits"] = w_bits
        if reduce_range is not None:
            data["reduce_range"] = reduce_range
            if reduce_range:
                data["weight"]["bits"] = min(data["weight"]["bits"], 7)
        if a_bits is not None:
            data["activation"]["bits"] = a_bits
        if binary_weights is not None:
            data["binary_weights"] = binary_weights
        if first_last is not None:
            data["first_last"] = first_last
        if residual is not None:
            data["placement"]["add_output"] = residual == "quantized"
        if skip is not None:
            data["placement"]["add_inputs"] = skip == "quantized"
        try:
            return BackendSpec.model_validate(data)
        except ValidationError as exc:
            given = {"weight": ("--w-bits", w_bits), "activation": ("--a-bits", a_bits),
                     "first_last": ("--first-last", first_last), "reduce_range": ("--reduce-range", reduce_range),
                     "placement": ("--residual/--skip", residual or skip)}
            raise ConfigError("; ".join(self._override_problem(e, given) for e in exc.errors())) from None

    def _override_problem(self, error: Any, given: dict[str, tuple[str, Any]]) -> str:
        """One validation error of :meth:`configure` as ``--option value: what is wrong`` (the spec itself was
        valid, so an override caused it)."""
        msg = str(error["msg"]).removeprefix("Value error, ")
        head = str(error["loc"][0]) if error["loc"] else re.split(r"[. ]", msg, maxsplit=1)[0]
        msg = re.sub(r"^\w+(\.\w+)? \S+: ", "", msg)  # "weight.bits 1: " is said by the option below
        option, value = given.get(head, ("", None))
        if value is None:  # not one override's field: name every override given
            named = [f"{o} {v}" for o, v in given.values() if v is not None]
            return f"{', '.join(named) or 'the overrides'}: {msg}"
        role = {"weight": f"{self.name}'s weights: ", "activation": f"{self.name}'s activations: "}.get(head, "")
        return f"{option} {value}: {role if self.name not in msg else ''}{msg}"

    def first_last_bits(self, default: int) -> int | None:
        """Bits for the first/last layer (None: kept in floating point)."""
        if self.first_last == "fp":
            return None
        if self.first_last == "same":
            return default
        return int(self.first_last)

    def quantized_ops(self) -> str:
        """Human-readable list of what is quantized, for tables and cards."""
        p = self.placement
        if p.mode == "inputs":
            return "conv/linear inputs + weights"
        ops = ["conv/linear"]
        if p.add_output:
            ops.append("add")
        if p.pool:
            ops.append("pool")
        if p.concat_shared:
            ops.append("concat(shared)")
        if p.other_ops:
            ops.append("other")
        return ", ".join(ops)
