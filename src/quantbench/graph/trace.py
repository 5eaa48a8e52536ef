"""torch.fx tracing with an error that says what failed and how to work around it."""

from __future__ import annotations

import traceback
from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from quantbench.errors import TraceError


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaf_modules: Iterable[type[nn.Module]] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; modules of ``leaf_modules`` types are kept as opaque calls."""
    tracer = _LeafTracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        raise TraceError(_explain(model, exc)) from exc
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _explain(model: nn.Module, exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "torch/fx" not in f.filename.replace("\\", "/")]
    where = f"{user[-1].filename}:{user[-1].lineno} in {user[-1].name}: {user[-1].line}" if user else "?"
    return (
        f"torch.fx cannot trace {model.__class__.__name__}: {type(exc).__name__}: {exc}\n"
        f"  failing call: {where}\n"
        "  fix: remove data-dependent Python control flow from that forward, or mark the module that "
        "contains it as a leaf (quantbench keeps leaves as opaque calls): "
        "quantbench.graph.quantize.prepare(model, ..., leaf_modules=[ThatModuleClass])"
    )
