"""ONNX Runtime's CPU integer kernels, reproduced in the simulation (backends with ``arithmetic: onnxruntime``).

ONNX Runtime (ORT) turns a QDQ graph into integer kernels where it can and runs the rest in float on
dequantized values. Bit for bit, at inference (``torch.no_grad()``) the simulation computes what ORT
computes:

* **QLinearConv / QGemm** (a conv or linear whose input comes from a quantizer and whose output goes
  into one, possibly through clamps): ``acc = sum((x_q - z_x) * (w_q - z_w)) + b_q`` exactly in int32, then
  ``y_q = sat(rne(float32(acc) * M) + z_y)`` with ``M = float32(float32(s_x * s_w) / s_y)`` per output
  channel (ORT ``QLinearConv::ComputeOutputScale``, ``MlasRequantizeOutput``).
* **QGemm with float output** (the logits): ``float32(acc + b_q) * float32(s_x * s_w)``.
* **int32 bias** for every quantized conv/linear, fused or not: ``b_q = rne(b / float32(s_x * s_w))``,
  zero-point 0 (ORT's QDQ convention); the float fallback adds the dequantized ``b_q * s_x * s_w``.
* **QLinearAdd** (MLAS AVX2 kernel): ``y_q = sat(rne(fma(a_q, r_a, fma(b_q, r_b, c))))`` with
  ``r_a = float32(s_a / s_y)``, ``r_b = float32(s_b / s_y)``, ``c = z_y - fma(r_a, z_a, r_b z_b)`` (the
  compiled kernel contracts that sum into an FMA; checked against ORT 1.32 output codes), on codes and
  zero-points shifted by 128 where ORT turned int8 tensors into uint8.
* **QLinearGlobalAveragePool**: ``y_q = sat(rne(float32(sum(x_q) - z_x N) * float32(s_x / float32(s_y N)))
  + z_y)``.
* **QuantizeLinear** (everything left in float): ``rne(x / s) + z`` -- a division, as ONNX specifies.

With ``arithmetic: torch-x86`` the kernels are PyTorch's x86 engine's (``torch.ops.quantized``, what a
``torch.ao`` model runs; the add and pool formulas live in :mod:`quantbench.graph.torch_engines`; each formula is
checked against the kernel in ``tests/test_torch_arithmetic.py``):

* **conv / linear (FBGEMM)**: ``y_q = sat(rne((float32(acc) + float32(b / s_xw)) * M) + z_y)``, the float
  bias ``b = float32(b_q s_xw)`` as the QDQ export stores it;
* **conv (oneDNN)**: on Linux CPUs with AVX512-VNNI the engine runs convolutions with symmetric weights on
  oneDNN (:func:`x86_conv_kernel`): ``y_q = sat(rne(((float32(acc) s_x) s_w + b) float32(1 / s_y) + z_y))``;
  so, like the engine, the simulation depends on the host CPU;
* **float-output linear** (the logits): ``F.linear`` on the dequantized input, weight and bias, as the
  exported graph reads (no QGemm);

* **add**: ``y_q = sat(rne((fma(s_a, a_q, -s_a z_a) + fma(s_b, b_q, -s_b z_b)) * float32(1 / s_y)) + z_y)``
  in float32, int8 tensors as uint8 with codes and zero-points + 128 (the kernels take quint8 only);
* **global average pool**: the kernel keeps the input's scale and zero-point, ``p_q = rne(sum(x_q) / N)``;
  where the output quantizer differs, the model requantizes: ``rne(float32((p_q - z_x) s_x) * float32(1 / s_y))
  + z_y``.

Which quantizers feed and follow each op is worked out on the fx graph by :mod:`quantbench.graph.linking`.
Which ops fuse follows ORT's rules on the calibrated values (:meth:`Links.fusable`): inputs from
DequantizeLinear, output into one QuantizeLinear at the full 8-bit container range (narrow and sub-8-bit
ranges are exported with a Clip, which ORT keeps in float), one container type. The export makes the rest
hold with exact copies of quantizers (``quantbench.deploy.lower``): it re-quantizes inputs that reach an op
through Pad/Slice/Flatten ("regrid"), quantizes before a Relu/Clip that ORT would keep (ORT drops a Relu
only at the container's minimum zero-point, ``ReluQuantTransformer``; clamping commutes with a monotone
quantizer), and gives each reader of an int8 tensor its own pair (``QDQS8ToU8Transformer`` turns int8 pairs
into uint8 only for single-reader QuantizeLinear nodes; see :func:`stays_int8`).

The integer path returns the requantized output already dequantized; the following quantizer
re-quantizes it exactly (values on its own grid), so the graph keeps its structure. With gradients
enabled (QAT) every module falls back to fake quantization with the straight-through estimator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantbench.graph.torch_engines import ADD_KERNELS, POOL_KERNELS, x86_conv_kernel
from quantbench.graph.torch_engines import scalar32 as _scalar
from quantbench.quant.fake_quant import quantize
from quantbench.quant.quantizer import Quantizer

if TYPE_CHECKING:
    from quantbench.graph.qmodules import QuantWeighted

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EXACT_FLOAT32 = 2**24  # integers below this are exact in float32
_EPS32 = torch.finfo(torch.float32).eps
#: the runtimes whose integer kernels the simulation computes (a backend spec's ``arithmetic``)
INTEGER_ARITHMETICS = ("onnxruntime", *ADD_KERNELS)
#: the integer arithmetics of PyTorch's engines (:mod:`quantbench.graph.torch_engines`)
TORCH_ARITHMETICS = tuple(ADD_KERNELS)


# ------------------------------------------------------------------------------------------ helpers
def container(q: Quantizer) -> tuple[int, int]:
    """The 8-bit container range a quantizer exports into (int8 when its range is signed)."""
    return (-128, 127) if q.qmin < 0 else (0, 255)


def stays_int8(q: Quantizer) -> bool:
    """Whether ORT keeps this tensor in int8 rather than turning its QDQ pair into uint8.

    ``QDQS8ToU8Transformer`` converts an int8 QuantizeLinear -> DequantizeLinear pair to uint8 (zero-point +
    128, same values) when the QuantizeLinear has one consumer. The export gives each extra reader of an int8
    tensor its own pair, except where the tensor comes straight out of an op ORT could fuse (a second
    QuantizeLinear on that op's output would stop the fusion): such a tensor stays int8, and an op fuses
    only when all its tensors end up in the same type (set by
    :func:`quantbench.graph.linking.link_integer_arithmetic`)."""
    return q.ort_int8


def fits_container(q: Quantizer) -> bool:
    """Whether an op ending in this quantizer can fuse: per-tensor, full 8-bit container range (a narrower
    range is exported with a Clip before QuantizeLinear, which ORT keeps in float)."""
    return (q.qmin, q.qmax) == container(q) and q.scale.numel() == 1


def in_container(q: Quantizer) -> bool:
    """Whether an integer kernel can read this quantizer's tensor: per-tensor, at most 8 bits."""
    return q.scheme.bits <= 8 and q.scale.numel() == 1


def ready(*qs: Quantizer | None) -> bool:
    """Every quantizer exists, is calibrated and is quantizing with its static grid (not learning: a learning
    rule's grid moves every step, so the layer runs fake quantization until it is baked)."""
    return all(q is not None and q.quantizing and q.calibrated and not q.learning for q in qs)


def integer_mode() -> bool:
    """Integer arithmetic runs at inference; with gradients the modules fall back to fake quantization."""
    return not torch.is_grad_enabled()


def codes(x: Tensor, q: Quantizer) -> Tensor:
    """Integer codes (zero-point included, float dtype) of a tensor that is on ``q``'s grid."""
    # x = (q - z) * s in float32, so x * (1 / s) is within an ulp of the integer q - z: rounding recovers it
    inv = torch.reciprocal(_scalar(q.scale))
    return torch.mul(x.to(torch.float32), inv).round_().add_(float(q.zero_point.reshape(-1)[0]))


def requantize(v: Tensor, q: Quantizer, with_zero_point: bool = False) -> Tensor:
    """``(sat(rne(v) + z) - z) * s`` for pre-rounding float32 values ``v`` (``v`` already holding ``z``
    with ``with_zero_point``), dequantized in float32 as DequantizeLinear does."""
    z = float(q.zero_point.reshape(-1)[0])
    lo, hi = container(q)
    qv = torch.round(v)
    if not with_zero_point:
        qv.add_(z)
    return qv.clamp_(lo, hi).sub_(z).mul_(_scalar(q.scale))


@dataclass(frozen=True)
class Clamp:
    """An activation between an op and its output quantizer that ORT may fold into QuantizeLinear."""

    kind: str  # "relu" | "clip"
    lo: float = 0.0
    hi: float = float("inf")

    def removable(self, q: Quantizer) -> bool:
        """ORT's ReluQuantTransformer / ClipQuantFusion conditions for dropping this op before ``q``."""
        z = int(q.zero_point.reshape(-1)[0])
        cmin, cmax = container(q)
        if self.kind == "relu":
            return z == cmin
        s = _scalar(q.scale)
        lower = float(s * float(cmin - z))
        upper = float(s * float(cmax - z))
        return self.lo - lower <= _EPS32 and upper - self.hi <= _EPS32


def chain_removable(acts: list[Clamp], q: Quantizer) -> bool:
    return all(a.removable(q) for a in acts)


@dataclass
class Links:
    """How an op is wired to quantizers, for the integer path: a plain field of the op (``op.links``) that refers
    to quantizers living elsewhere in the module tree."""

    inputs: list[Quantizer | None]
    # input i reaches the op through value-preserving ops (pad, slice, flatten...): the export re-quantizes
    # it with a copy of its quantizer right before the op (exact: the values are on that grid), so ORT sees
    # DequantizeLinear -> op
    regrid: list[bool] = field(default_factory=list)
    out_q: Quantizer | None = None
    acts: list[Clamp] = field(default_factory=list)
    #: whose kernels the integer path computes (:data:`INTEGER_ARITHMETICS`)
    arithmetic: str = "onnxruntime"

    def __post_init__(self) -> None:
        if self.arithmetic not in INTEGER_ARITHMETICS:
            raise ValueError(f"unknown integer arithmetic {self.arithmetic!r}: one of "
                             f"{', '.join(INTEGER_ARITHMETICS)}")

    def inputs_ready(self) -> bool:
        return ready(*self.inputs) and all(q is not None and in_container(q) for q in self.inputs)

    def input_int8(self, i: int) -> bool:
        q = self.inputs[i]
        return q is not None and not self.regrid[i] and stays_int8(q)

    def fusable(self) -> bool:
        """ORT's QDQ fusion conditions, evaluated on the calibrated values: inputs from DequantizeLinear,
        output into one QuantizeLinear at the full container range, one container type.

        Clamp activations in between never prevent it: ORT drops the ones it can (:meth:`Clamp.removable`)
        and the export moves the others behind a copy of the output quantizer (:attr:`needs_copy`), which is
        exact because clamping commutes with a monotone quantizer. Either way the op runs as an integer
        kernel and the clamp acts on grid values.
        """
        if not self.inputs_ready() or not ready(self.out_q):
            return False
        out_q = self.out_q
        assert out_q is not None
        if self.arithmetic in TORCH_ARITHMETICS:  # the kernel's codes are clamped to a narrower range exactly (the
            return in_container(out_q)      # export's Clip): torch.ao's 7-bit activations stay integer
        out_int8 = False if self.needs_copy else stays_int8(out_q)
        return fits_container(out_q) and all(self.input_int8(i) == out_int8 for i in range(len(self.inputs)))

    @property
    def needs_copy(self) -> bool:
        """Whether the export must quantize the op's output before its clamps (ORT would keep them)."""
        return bool(self.acts) and self.out_q is not None and not chain_removable(self.acts, self.out_q)


# ------------------------------------------------------------------------------------ conv / linear
def bias_scale(layer: QuantWeighted, in_q: Quantizer) -> Tensor:
    """``float32(s_x * s_w)`` per output channel."""
    wq = layer.weight_quantizer
    assert wq is not None
    return (_scalar(in_q.scale) * wq.scale.reshape(-1).to(torch.float32)).reshape(-1)


def quantize_bias(b: Tensor, scale: Tensor) -> Tensor:
    """int32 bias codes (float dtype): ``clamp(rne(b / scale))``; ``scale`` broadcasts over ``b``."""
    return torch.clamp(torch.round(b.to(torch.float32) / scale.expand_as(b)), INT32_MIN, INT32_MAX)


def weight_codes(layer: QuantWeighted, w: Tensor) -> Tensor:
    """Integer weight codes (zero-point included, float dtype) of the folded weight ``w``."""
    q = layer.weight_quantizer
    assert q is not None
    return quantize(w, q.scale, q.zero_point, q.qmin, q.qmax, q.axis)


def _broadcast_channels(p: Tensor, like: Tensor, layer: QuantWeighted) -> Tensor:
    """Shape a per-output-channel vector to broadcast over the layer's output: channels at dim 1 for a
    convolution's (N, C, ...), last for a linear layer's (..., F) (tokens: (N, L, F))."""
    return p.reshape(-1) if layer.is_linear else p.reshape(1, -1, *([1] * (like.dim() - 2)))


def _weight_axis_shape(w: Tensor) -> list[int]:
    return [-1] + [1] * (w.dim() - 1)


def _centered_codes(layer: QuantWeighted, x: Tensor, w: Tensor, in_q: Quantizer) -> tuple[Tensor, Tensor]:
    """``x_q - z_x`` and ``w_q - z_w`` as integer-valued float32 (``x`` is on ``in_q``'s grid)."""
    wq = layer.weight_quantizer
    assert wq is not None
    kx = torch.mul(x.to(torch.float32), torch.reciprocal(_scalar(in_q.scale))).round_()
    wz = wq.zero_point.to(torch.float32)
    wz = wz.reshape(_weight_axis_shape(w)) if wz.numel() > 1 else wz.reshape(())
    return kx, weight_codes(layer, w).to(torch.float32) - wz


def integer_weighted(layer: QuantWeighted, x: Tensor, w: Tensor, b: Tensor | None, links: Links) -> Tensor:
    """QLinearConv / QGemm: exact int32 accumulation, float32 requantization, dequantized output."""
    in_q, wq, out_q = links.inputs[0], layer.weight_quantizer, links.out_q
    assert in_q is not None and wq is not None and out_q is not None
    kx, kw = _centered_codes(layer, x, w, in_q)
    bq = quantize_bias(b, bias_scale(layer, in_q)) if b is not None else None
    zx = int(in_q.zero_point.reshape(-1)[0])
    x_bound = max(abs(in_q.qmin - zx), abs(in_q.qmax - zx))  # |x_q - z_x| never exceeds the range
    bound = x_bound * float(kw.abs().reshape(kw.shape[0], -1).sum(1).amax())
    if bq is not None:
        bound += float(bq.abs().amax())
    # integer-valued float32 arithmetic is exact below 2^24 whatever the summation order (CPU convolutions
    # are direct or GEMM-based); otherwise (or on GPU, where Winograd / TF32 may round) use float64
    exact32 = x.device.type == "cpu" and bound < EXACT_FLOAT32
    dt = torch.float32 if exact32 else torch.float64
    acc = layer.compute(kx.to(dt), kw.to(dt), None)
    torch_x86 = links.arithmetic == "torch-x86"  # QNNPACK's convolutions are ORT's formula (within a code)
    if bq is not None and not torch_x86:
        acc.add_(_broadcast_channels(bq.to(dt), acc, layer))
    if not exact32:
        acc = acc.round_().clamp_(INT32_MIN, INT32_MAX).to(torch.float32)
    if torch_x86 and x86_conv_kernel(layer) == "onednn":
        return _onednn_requantize(layer, acc.float(), bq, in_q, out_q).to(x.dtype)
    if torch_x86 and bq is not None:  # FBGEMM: the float bias (b_q s_xw) divided back by s_xw, added to acc
        sxw = bias_scale(layer, in_q)
        acc = acc.float().add_(_broadcast_channels((bq * sxw) / sxw, acc, layer))
    m = (_scalar(in_q.scale) * wq.scale.reshape(-1).to(torch.float32)) / _scalar(out_q.scale)
    v = acc.mul_(_broadcast_channels(m, acc, layer) if m.numel() > 1 else m.reshape(()))
    return requantize(v, out_q).to(x.dtype)


def _onednn_requantize(layer: QuantWeighted, acc: Tensor, bq: Tensor | None, in_q: Quantizer,
                       out_q: Quantizer) -> Tensor:
    """oneDNN's int8 convolution output: ``sat(rne(((float32(acc) * s_x) * s_w + b) * float32(1 / s_y) + z_y))``
    in float32, ``b = float32(b_q s_xw)`` the float bias; dequantized."""
    wq = layer.weight_quantizer
    assert wq is not None
    v = acc.mul_(_scalar(in_q.scale)).mul_(_broadcast_channels(wq.scale.reshape(-1).to(torch.float32), acc, layer))
    if bq is not None:
        v.add_(_broadcast_channels(bq * bias_scale(layer, in_q), acc, layer))
    inv = torch.tensor(1.0 / float(_scalar(out_q.scale)), dtype=torch.float32)
    return requantize(v.mul_(inv).add_(float(out_q.zero_point.reshape(-1)[0])), out_q, with_zero_point=True)


def qgemm_float_output(layer: QuantWeighted, links: Links) -> bool:
    """ORT turns DequantizeLinear -> Gemm with a float output (the logits) into QGemm with float output."""
    return layer.is_linear and links.inputs_ready() and weight_type_ok(layer)


def integer_linear_float_output(layer: QuantWeighted, x: Tensor, w: Tensor, b: Tensor | None,
                                links: Links) -> Tensor:
    """QGemm with float output: ``float32(acc + b_q) * float32(s_x * s_w)`` (MLAS scale-bias post-processor)."""
    in_q = links.inputs[0]
    assert in_q is not None
    kx, kw = _centered_codes(layer, x, w, in_q)
    acc = F.linear(kx.double(), kw.double())  # exact integers
    scale = bias_scale(layer, in_q)  # float32(s_x * s_w)
    if b is not None:
        acc = acc + quantize_bias(b, scale).double()
    return (acc.float() * scale).to(x.dtype)


def weighted_forward(layer: QuantWeighted, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """A quantized layer at inference: int32 bias always, the integer kernel where ORT fuses."""
    links = layer.links
    in_q = links.inputs[0] if links is not None else None
    if links is None or in_q is None or not ready(in_q, layer.weight_quantizer) or in_q.scale.numel() != 1:
        return layer.compute(x, w, b)
    if links.fusable() and weight_type_ok(layer):
        return integer_weighted(layer, x, w, b, links)
    if links.out_q is None and links.arithmetic == "onnxruntime" and qgemm_float_output(layer, links):
        return integer_linear_float_output(layer, x, w, b, links)
    if b is not None:
        sb = bias_scale(layer, in_q)
        b = quantize_bias(b, sb) * sb.expand_as(b)
    return layer.compute(x, w, b)


def weight_type_ok(layer: QuantWeighted) -> bool:
    """8-bit weights at most (int8 activations run as uint8 in ORT, see the module docstring, so any
    8-bit weight type fuses)."""
    wq = layer.weight_quantizer
    assert wq is not None
    return wq.scheme.bits <= 8


# ------------------------------------------------------------------------------------ add and pool
class IntAdd(nn.Module):
    """A residual add that runs its runtime's integer add (ORT's QLinearAdd, or PyTorch's x86 quantized add)
    when its inputs and output are quantized."""

    quantbench_kind = "add"

    def __init__(self, links: Links) -> None:
        super().__init__()
        self.links = links

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        links = self.links
        if not (integer_mode() and links.fusable()):
            return a + b
        qa, qb, qy = links.inputs[0], links.inputs[1], links.out_q
        assert qa is not None and qb is not None and qy is not None
        if links.arithmetic in ADD_KERNELS:
            kernel = ADD_KERNELS[links.arithmetic]
            return requantize(kernel(codes(a, qa), codes(b, qb), qa, qb, qy), qy, with_zero_point=True).to(a.dtype)
        sy = _scalar(qy.scale)
        ra, rb = _scalar(qa.scale) / sy, _scalar(qb.scale) / sy  # float32 ratios
        # int8 tensors ORT turned into uint8 (stays_int8 False) run with codes and zero-points + 128: the same
        # values, but this float kernel rounds differently with the shifted zero-points
        out_int8 = False if links.needs_copy else stays_int8(qy)
        shift = 128.0 if qy.qmin < 0 and not out_int8 else 0.0
        za, zb, zy = (float(q.zero_point.reshape(-1)[0]) + shift for q in (qa, qb, qy))
        # c = z_y - (r_a z_a + r_b z_b): the compiler contracts the sum into fma(r_a, z_a, r_b z_b)
        inner = (ra.double() * za + (rb * zb).double()).float()
        fixed = torch.tensor(zy, dtype=torch.float32) - inner
        f64 = torch.float64
        ca, cb = codes(a, qa).to(f64).add_(shift), codes(b, qb).to(f64).add_(shift)  # integer codes
        t = cb.mul_(rb.to(f64)).add_(fixed.to(f64)).float()  # fma(b, r_b, c): exact in float64, one rounding
        v = ca.mul_(ra.to(f64)).add_(t.to(f64)).float().sub_(shift)  # fma(a, r_a, t), back to int8 codes
        return requantize(v, qy, with_zero_point=True).to(a.dtype)


class IntGlobalAvgPool(nn.Module):
    """Global average pooling that runs its runtime's integer pool (ORT's QLinearGlobalAveragePool, or PyTorch's
    x86 quantized pool and requantization) when quantized."""

    quantbench_kind = "pool"

    def __init__(self, links: Links) -> None:
        super().__init__()
        self.links = links

    def forward(self, x: Tensor) -> Tensor:
        links = self.links
        if not (integer_mode() and links.fusable()):
            return F.adaptive_avg_pool2d(x, 1)
        qx, qy = links.inputs[0], links.out_q
        assert qx is not None and qy is not None
        if links.arithmetic in POOL_KERNELS:
            return requantize(POOL_KERNELS[links.arithmetic](codes(x, qx), qx, qy), qy,
                              with_zero_point=True).to(x.dtype)
        n = x.shape[-1] * x.shape[-2]
        zx = float(qx.zero_point.reshape(-1)[0])
        acc = codes(x, qx).double().sum(dim=(-2, -1), keepdim=True) - zx * n
        scale = _scalar(qx.scale) / (_scalar(qy.scale) * torch.tensor(float(n), dtype=torch.float32))
        v = acc.float() * scale
        return requantize(v, qy).to(x.dtype)


def linked_ops(gm: nn.Module) -> dict[str, nn.Module]:
    """Every op wired to ONNX Runtime's integer arithmetic (layers, adds, global pools), by module name."""
    from quantbench.graph.qmodules import QuantWeighted

    return {name: m for name, m in gm.named_modules()
            if isinstance(m, (QuantWeighted, IntAdd, IntGlobalAvgPool)) and m.links is not None}


def integer_kernel(m: nn.Module) -> str | None:
    """The ORT integer kernel a linked op runs as after calibration (None: it stays in float).

    The one decision of which op runs as which kernel: the simulation (:func:`weighted_forward`,
    :class:`IntAdd`, :class:`IntGlobalAvgPool`) and the exporter (:mod:`quantbench.deploy.lower`) both ask it.
    """
    from quantbench.graph.qmodules import QuantWeighted

    if not isinstance(m, (QuantWeighted, IntAdd, IntGlobalAvgPool)) or m.links is None:
        return None
    links = m.links
    if isinstance(m, (IntAdd, IntGlobalAvgPool)):
        if not links.fusable():
            return None
        return "QLinearAdd" if isinstance(m, IntAdd) else "QLinearGlobalAveragePool"
    if not ready(m.weight_quantizer):
        return None
    if links.fusable() and weight_type_ok(m):
        return "QGemm" if m.is_linear else "QLinearConv"
    if links.out_q is None and qgemm_float_output(m, links):
        return "QGemm"
    return None


def integer_groups(gm: nn.Module) -> dict[str, str]:
    """Which ops the simulation ran as ORT integer kernels, by module name (after calibration)."""
    return {name: k for name, m in gm.named_modules() if (k := integer_kernel(m)) is not None}
