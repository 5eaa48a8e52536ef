"""ONNX operators on torch tensors (integer codes or floats alike): data movement, and the float reference of the
compute ops the PyTorch-engine runtime (:mod:`quantbench.deploy.runtimes.torch_qdq`) leaves in float."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor

from quantbench.deploy.errors import RuntimeUnavailableError

MOVEMENT_OPS = frozenset({"Slice", "Pad", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                          "MaxPool"})


class Unsupported(Exception):
    """The engine has no integer kernel for this case (the node runs in float, with this reason)."""


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def scalar(v: Any) -> float:
    return float(v.reshape(-1)[0]) if isinstance(v, Tensor) else float(v)


def input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    """The graph input's shape with dynamic dimensions as 1."""
    return tuple(d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim)



def _slice(x: Tensor, starts: Tensor, ends: Tensor, axes: Tensor | None = None, steps: Tensor | None = None) -> Tensor:
    axes_l = list(range(len(starts))) if axes is None else [int(a) % x.dim() for a in axes]
    steps_l = [1] * len(starts) if steps is None else [int(s) for s in steps]
    index = [slice(None)] * x.dim()
    for a, s, e, st in zip(axes_l, starts.tolist(), ends.tolist(), steps_l, strict=True):
        if st < 0:
            raise Unsupported("Slice with a negative step")
        n = x.shape[a]
        index[a] = slice(max(0, min(n, s + n if s < 0 else s)), max(0, min(n, e + n if e < 0 else e)), st)
    return x[tuple(index)]


def pad_tensor(x: Tensor, pads: Tensor, value: float, mode: str) -> Tensor:
    if mode != "constant":
        raise Unsupported(f"Pad mode {mode!r}")
    p = [int(v) for v in pads]
    half = len(p) // 2
    torch_pads: list[int] = []
    for axis in reversed(range(half)):
        torch_pads += [p[axis], p[axis + half]]
    if x.dtype in (torch.uint8, torch.int8):
        return F.pad(x.to(torch.int16), torch_pads, value=int(value)).to(x.dtype)
    return F.pad(x, torch_pads, value=value)


def _reshape(x: Tensor, shape: Tensor) -> Tensor:
    dims = [int(d) if int(d) != 0 else x.shape[i] for i, d in enumerate(shape.tolist())]
    return x.reshape(dims)


def _maxpool(x: Tensor, a: dict[str, Any]) -> Tensor:
    k = a["kernel_shape"]
    pads = a.get("pads", [0] * 2 * len(k))
    if pads[: len(k)] != pads[len(k):]:
        raise Unsupported("MaxPool with asymmetric pads")
    integer = x.dtype in (torch.uint8, torch.int8)
    y = F.max_pool2d(x.float() if integer else x, k, a.get("strides", k), pads[: len(k)], a.get("dilations", 1),
                     ceil_mode=bool(a.get("ceil_mode", 0)))
    return y.to(x.dtype) if integer else y  # max commutes with dequantization: exact on codes


def move(node: onnx.NodeProto, x: Tensor, rest: list[Any]) -> Tensor:
    """``node`` (a data-movement op) applied to ``x`` (codes or floats); ``rest`` are its other (constant) inputs."""
    a, op = attrs(node), node.op_type
    if op == "Slice":
        return _slice(x, *rest)
    if op == "Pad":
        value = scalar(rest[1]) if len(rest) > 1 and rest[1] is not None else 0.0
        return pad_tensor(x, rest[0], value, a.get("mode", b"constant").decode() if isinstance(a.get("mode"), bytes)
                    else a.get("mode", "constant"))
    if op == "Reshape":
        return _reshape(x, rest[0])
    if op == "Flatten":
        axis = a.get("axis", 1) % max(x.dim(), 1)
        return x.reshape(math.prod(x.shape[:axis]), -1)
    if op == "Transpose":
        return x.permute(*(a.get("perm") or reversed(range(x.dim()))))
    if op == "Squeeze":
        axes = rest[0].tolist() if rest else a.get("axes")
        return x.squeeze(tuple(axes)) if axes is not None else x.squeeze()
    if op == "Unsqueeze":
        axes = [int(v) for v in (rest[0] if rest and rest[0] is not None else a["axes"])]
        for ax in sorted(v % (x.dim() + len(axes)) for v in axes):
            x = x.unsqueeze(ax)
        return x
    if op == "MaxPool":
        return _maxpool(x, a)
    return x  # Identity


# ---- float execution ------------------------------------------------------------------------------------------------

def conv_padding(a: dict[str, Any], nd: int) -> tuple[list[int], list[int] | None]:
    """``(symmetric padding, explicit F.pad list or None)`` of an ONNX Conv's ``pads``."""
    pads = a.get("pads", [0] * 2 * nd)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Unsupported(f"auto_pad {a['auto_pad']!r}")
    if pads[:nd] == pads[nd:]:
        return list(pads[:nd]), None
    torch_pads: list[int] = []
    for axis in reversed(range(nd)):
        torch_pads += [pads[axis], pads[axis + nd]]
    return [0] * nd, torch_pads


#: ONNX ops that are one torch function of their inputs
ELEMENTWISE: dict[str, Callable[..., Tensor]] = {
    "MatMul": torch.matmul, "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
}


def float_op(node: onnx.NodeProto, xs: list[Any]) -> Tensor:
    """ONNX ``node`` on float inputs (``None`` for absent optional inputs)."""
    a, op = attrs(node), node.op_type
    if op == "Conv":
        nd = xs[1].dim() - 2
        padding, explicit = conv_padding(a, nd)
        x = F.pad(xs[0], explicit) if explicit else xs[0]
        conv = F.conv2d if nd == 2 else F.conv1d
        return conv(x, xs[1], xs[2] if len(xs) > 2 else None, a.get("strides", 1), padding,
                    a.get("dilations", 1), a.get("group", 1))
    if op == "Gemm":
        if a.get("transB") and not a.get("transA") and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0:
            return F.linear(xs[0], xs[1], xs[2] if len(xs) > 2 else None)  # what a float nn.Linear runs
        x, w = xs[0].t() if a.get("transA") else xs[0], xs[1].t() if a.get("transB") else xs[1]
        y = a.get("alpha", 1.0) * (x @ w)
        return y + a.get("beta", 1.0) * xs[2] if len(xs) > 2 and xs[2] is not None else y
    if op in ELEMENTWISE:
        return ELEMENTWISE[op](*xs)
    if op == "Clip":
        lo = scalar(xs[1]) if len(xs) > 1 and xs[1] is not None else a.get("min", -math.inf)
        hi = scalar(xs[2]) if len(xs) > 2 and xs[2] is not None else a.get("max", math.inf)
        return xs[0].clamp(lo, hi)
    if op == "HardSigmoid":
        return (a.get("alpha", 0.2) * xs[0] + a.get("beta", 0.5)).clamp(0, 1)
    if op == "HardSwish":
        return F.hardswish(xs[0])
    if op == "Softmax":
        return torch.softmax(xs[0], a.get("axis", -1))
    if op == "AveragePool":
        k = a["kernel_shape"]
        pads = a.get("pads", [0] * 2 * len(k))
        return F.avg_pool2d(xs[0], k, a.get("strides", k), pads[: len(k)], bool(a.get("ceil_mode", 0)),
                            bool(a.get("count_include_pad", 0)))
    if op == "Concat":
        return torch.cat(xs, a["axis"])
    if op == "ReduceMean":
        axes = xs[1].tolist() if len(xs) > 1 else a.get("axes")
        return xs[0].mean(dim=tuple(axes), keepdim=bool(a.get("keepdims", 1)))
    if op in MOVEMENT_OPS:
        return move(node, xs[0], xs[1:])
    raise RuntimeUnavailableError(f"the PyTorch-engine runtime has no implementation of ONNX op {op!r} "
                                  f"(node {node.name!r}); run this model with --runtime onnxruntime")
