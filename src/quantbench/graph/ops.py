"""What each fx node is, for placement: a table from module types and functions to op kinds."""

from __future__ import annotations

import operator
from enum import Enum

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


class OpKind(str, Enum):
    WEIGHTED = "weighted"  # conv / linear: weights quantized, inputs always quantized
    BN = "bn"  # standalone batch norm (foldable into a preceding conv)
    ACT = "act"  # elementwise activation, fused into the preceding op
    ADD = "add"  # residual add
    POOL = "pool"
    CAT = "cat"
    PASS = "pass"  # shape / indexing ops that keep values on the same grid
    OTHER = "other"  # any other compute op producing a tensor
    NONE = "none"  # placeholders, outputs, attributes, non-tensor values


MODULE_KINDS: dict[type[nn.Module], OpKind] = {
    nn.Conv1d: OpKind.WEIGHTED,
    nn.Conv2d: OpKind.WEIGHTED,
    nn.Linear: OpKind.WEIGHTED,
    nn.BatchNorm1d: OpKind.BN,
    nn.BatchNorm2d: OpKind.BN,
    nn.ReLU: OpKind.ACT,
    nn.ReLU6: OpKind.ACT,
    nn.Hardtanh: OpKind.ACT,
    nn.LeakyReLU: OpKind.ACT,
    nn.SiLU: OpKind.ACT,
    nn.Hardswish: OpKind.ACT,
    nn.Hardsigmoid: OpKind.ACT,
    nn.Sigmoid: OpKind.ACT,
    nn.GELU: OpKind.ACT,
    nn.AdaptiveAvgPool2d: OpKind.POOL,
    nn.AvgPool2d: OpKind.POOL,
    nn.MaxPool2d: OpKind.POOL,
    nn.AdaptiveMaxPool2d: OpKind.POOL,
    nn.Flatten: OpKind.PASS,
    nn.Dropout: OpKind.PASS,
    nn.Identity: OpKind.PASS,
}

FUNCTION_KINDS: dict[object, OpKind] = {
    operator.add: OpKind.ADD,
    operator.iadd: OpKind.ADD,
    torch.add: OpKind.ADD,
    torch.cat: OpKind.CAT,
    torch.concat: OpKind.CAT,
    F.relu: OpKind.ACT,
    torch.relu: OpKind.ACT,
    F.relu6: OpKind.ACT,
    F.hardtanh: OpKind.ACT,
    F.silu: OpKind.ACT,
    F.hardswish: OpKind.ACT,
    F.hardsigmoid: OpKind.ACT,
    torch.sigmoid: OpKind.ACT,
    F.adaptive_avg_pool2d: OpKind.POOL,
    F.avg_pool2d: OpKind.POOL,
    F.max_pool2d: OpKind.POOL,
    torch.flatten: OpKind.PASS,
    torch.reshape: OpKind.PASS,
    torch.transpose: OpKind.PASS,
    torch.chunk: OpKind.PASS,
    torch.split: OpKind.PASS,
    operator.getitem: OpKind.PASS,
    F.pad: OpKind.PASS,
    F.dropout: OpKind.PASS,
}

METHOD_KINDS: dict[str, OpKind] = {
    "add": OpKind.ADD,
    "add_": OpKind.ADD,
    "relu": OpKind.ACT,
    "relu_": OpKind.ACT,
    "sigmoid": OpKind.ACT,
    "view": OpKind.PASS,
    "reshape": OpKind.PASS,
    "flatten": OpKind.PASS,
    "transpose": OpKind.PASS,
    "permute": OpKind.PASS,
    "contiguous": OpKind.PASS,
    "chunk": OpKind.PASS,
    "split": OpKind.PASS,
    "squeeze": OpKind.PASS,
    "unsqueeze": OpKind.PASS,
    "size": OpKind.NONE,
    "dim": OpKind.NONE,
}


def is_tensor_node(node: fx.Node) -> bool:
    """Whether shape propagation recorded a tensor for this node."""
    return "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> OpKind:
    """Classify ``node``; modules are matched by type (subclasses included)."""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        for cls in type(mod).__mro__:
            if cls in MODULE_KINDS:
                return MODULE_KINDS[cls]
        kind = getattr(mod, "quantbench_kind", None)
        return OpKind(kind) if kind else (OpKind.OTHER if is_tensor_node(node) else OpKind.NONE)
    if node.op == "call_function":
        kind = FUNCTION_KINDS.get(node.target)
        if kind is not None:
            return kind
    elif node.op == "call_method":
        kind = METHOD_KINDS.get(str(node.target))
        if kind is not None:
            return kind
    else:
        return OpKind.NONE
    return OpKind.OTHER if is_tensor_node(node) else OpKind.NONE


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes of ``node`` that carry tensors, in argument order (lists flattened)."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) if is_tensor_node(n) else None)
    return out
