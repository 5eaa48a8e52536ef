"""Wrap conv/linear layers into ``QuantWeighted``; fold a following BatchNorm where the backend does."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch.fx as fx
from torch import nn

from quantbench.graph.ops import OpKind, op_kind
from quantbench.graph.qmodules import QuantWeighted
from quantbench.quant.quantizer import Quantizer


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)


def wrap_weighted(
    gm: fx.GraphModule,
    fold_bn: bool,
    make_weight_quantizer: Callable[[str, fx.Node], Quantizer | None],
) -> list[fx.Node]:
    """Replace every conv/linear call by a ``QuantWeighted`` (BN folded in when ``fold_bn`` and the
    conv's only user is a BN). Returns the weighted nodes in topological order."""
    modules = dict(gm.named_modules())
    weighted: list[fx.Node] = []
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or op_kind(node, modules) is not OpKind.WEIGHTED:
            continue
        mod = modules[str(node.target)]
        if isinstance(mod, QuantWeighted):
            raise ValueError(f"{node.target} is already quantized: prepare a float model")
        if calls[str(node.target)] > 1:
            raise ValueError(f"module {node.target} is called more than once; quantbench needs one call per layer")
        bn = None
        users = list(node.users)
        if fold_bn and len(users) == 1 and users[0].op == "call_module":
            bn_mod = modules[str(users[0].target)]
            if op_kind(users[0], modules) is OpKind.BN and isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                bn = bn_mod
                bn_node = users[0]
                bn_node.replace_all_uses_with(node)
                gm.graph.erase_node(bn_node)
        wrapper = QuantWeighted(mod, make_weight_quantizer(str(node.target), node), bn)
        _set_submodule(gm, str(node.target), wrapper)
        weighted.append(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return weighted
