"""Quantizers and BatchNorms that switch bit-width (seed 002): one learning rule and one BatchNorm per bit-width,
chosen per block from the shared :class:`~quantbench.coquant.state.BitState` on every forward.

* :class:`MultiBitRule` hosts one rule of the algorithm per bit-width (PACT: one clipping value α per bit-width, as
  AdaBits' ``switch_alpha``; DoReFa weights need none). The float weights are shared by every bit-width.
* :class:`SwitchableBatchNorm` is switchable BN (Any-Precision DNNs, AdaBits): one BatchNorm per bit-width, so a
  forward at ``b`` updates only ``b``'s statistics. *Interpretation* (seed 002 is silent): a block swapped in from
  a teacher (:mod:`quantbench.coquant.swap`) normalises with the teacher's running statistics and does not update
  them, since that forward trains the student.
* The first and last layer keep the backend's bits (seed 002 follows PACT / DoReFa there; the academic setting puts
  them at 8 bits): their quantizers do not switch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from quantbench.coquant.state import BitState
from quantbench.errors import ConfigError
from quantbench.graph.qmodules import QuantWeighted
from quantbench.graph.quantize import all_quantizers, list_layers
from quantbench.ptq.calibrate import estimate_bn_statistics
from quantbench.quant.learning import LearningRule, QuantizerContext
from quantbench.recon.units import partition

RuleBuilder = Callable[[QuantizerContext], LearningRule]

#: how an unseen bit-width's clipping values start (interpretation: seed 002 says nothing; AdaBits keeps one α per
#: trained bit-width only): ``linear`` interpolates them in bit-width between the trained neighbours (the nearest
#: outside B), ``nearest`` copies the nearest trained bit-width's (the higher one on a tie)
ZERO_SHOT_RANGES = ("linear", "nearest")


def _clip_range(rule: LearningRule) -> tuple[Tensor | None, Tensor | None]:
    try:
        lo, hi = rule.clip_range()
    except NotImplementedError:
        return None, None
    return lo, hi


def nearest_trained(trained: tuple[int, ...], bits: int) -> int:
    """The trained bit-width closest to ``bits`` (the higher one on a tie)."""
    return min(trained, key=lambda t: (abs(t - bits), -t))


def start_range(rule: MultiBitRule, bits: int, trained: tuple[int, ...], mode: str = "linear"
                ) -> tuple[Tensor, Tensor] | None:
    """The clipping range ``rule``'s new ``bits`` rule starts from (:data:`ZERO_SHOT_RANGES`); None when the rule
    has no range to learn (DoReFa weights)."""
    if mode not in ZERO_SHOT_RANGES:
        raise ConfigError(f"zero-shot ranges: {mode!r} is not one of {', '.join(ZERO_SHOT_RANGES)}")
    below = [t for t in trained if t < bits]
    above = [t for t in trained if t > bits]
    if mode == "nearest" or not below or not above:
        lo, hi = _clip_range(rule.at(nearest_trained(trained, bits)))
        return None if lo is None or hi is None else (lo, hi)
    b0, b1 = max(below), min(above)
    lo0, hi0 = _clip_range(rule.at(b0))
    lo1, hi1 = _clip_range(rule.at(b1))
    if lo0 is None or hi0 is None or lo1 is None or hi1 is None:
        return None
    w = (bits - b0) / (b1 - b0)
    return torch.lerp(lo0, lo1, w), torch.lerp(hi0, hi1, w)


def context_at(ctx: QuantizerContext, bits: int) -> QuantizerContext:
    """``ctx`` at another bit-width, keeping the signedness calibration chose."""
    scheme = ctx.scheme.with_bits(bits)
    qmin, qmax = scheme.qrange(signed=ctx.signed)
    return QuantizerContext(scheme, qmin, qmax, ctx.is_weight, ctx.name, ctx.hardware, ctx.channels)


class MultiBitRule(LearningRule):
    """One inner rule per bit-width; the forward uses the one of its block's current bit-width."""

    algorithm = "coquant"

    def __init__(self, ctx: QuantizerContext, options: BaseModel, state: BitState, block: int, build: RuleBuilder,
                 bits: tuple[int, ...], init: LearningRule | None = None) -> None:
        super().__init__(ctx, options)
        self.state, self.block, self.build = state, block, build
        self.rules = nn.ModuleDict()
        for b in bits:
            self.add_bits(b, init)
        self.mark_initialized()

    def add_bits(self, bits: int, like: LearningRule | None = None,
                 start: tuple[Tensor, Tensor] | None = None) -> LearningRule:
        """A rule for ``bits``, starting from ``start`` (a clipping range) or else ``like``'s clipping range (the
        calibration, or a trained bit-width)."""
        rule = self.build(context_at(self.ctx, bits))
        if like is not None or start is not None:
            lo, hi = start if start is not None else _clip_range(like)  # type: ignore[arg-type]
            if lo is not None and hi is not None:
                rule.init_from_range(lo.detach().reshape(-1), hi.detach().reshape(-1))
            rule.mark_initialized()
        self.rules[str(bits)] = rule
        return rule

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(int(b) for b in self.rules))

    def at(self, bits: int) -> LearningRule:
        try:
            return self.rules[str(bits)]  # type: ignore[return-value]
        except KeyError:
            raise ConfigError(f"{self.name}: no quantizer for {bits} bits (it has {list(self.bits)}); add it with "
                              "quantbench.coquant.switch.add_bits (BN-calibrated zero-shot)") from None

    @property
    def current(self) -> LearningRule:
        return self.at(self.state.bits_of(self.block))

    @property
    def qmin(self) -> int:
        return self.current.qmin

    @property
    def qmax(self) -> int:
        return self.current.qmax

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        for r in self.rules.values():
            r.init_from_range(lo, hi)  # type: ignore[operator]

    def init_from_tensor(self, x: Tensor) -> None:
        """Each inner rule initialises itself on its first forward."""

    def quantize(self, x: Tensor) -> Tensor:
        return self.current(x)

    def export_qparams(self) -> tuple[Tensor, Tensor] | None:
        return self.current.export_qparams()

    def grid_refusal(self) -> str | None:
        return self.current.grid_refusal()

    def describe(self) -> dict[str, Any]:
        out = self.current.describe()
        out.update(algorithm=f"coquant({self.current.algorithm})", switched_bits=list(self.bits))
        return out


class SwitchableBatchNorm(nn.Module):
    """One BatchNorm per bit-width (switchable BN); the block's current bit-width picks it."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, bits: tuple[int, ...], state: BitState,
                 block: int) -> None:
        super().__init__()
        self.state, self.block = state, block
        self.bns = nn.ModuleDict({str(b): copy.deepcopy(bn) for b in bits})

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(int(b) for b in self.bns))

    def at(self, bits: int) -> nn.modules.batchnorm._BatchNorm:
        try:
            return self.bns[str(bits)]  # type: ignore[return-value]
        except KeyError:
            raise ConfigError(f"no BatchNorm for {bits} bits (it has {list(self.bits)}): calibrate one with "
                              "quantbench.coquant.switch.add_bits") from None

    def add_bits(self, bits: int, like: int) -> nn.modules.batchnorm._BatchNorm:
        """A BatchNorm for an unseen bit-width: ``like``'s affine parameters, statistics reset (to be calibrated)."""
        bn = copy.deepcopy(self.at(like))
        bn.reset_running_stats()
        self.bns[str(bits)] = bn
        return bn

    def forward(self, x: Tensor) -> Tensor:
        b = self.state.bits_of(self.block)
        bn = self.at(b)
        student = self.state.student
        if self.training and student is not None and b != student:  # a teacher block swapped in: its statistics
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return bn(x)


@dataclass
class Switched:
    """What :func:`make_switchable` did to a graph."""

    state: BitState
    blocks: list[list[str]]  # module names per block, in graph order
    rules: dict[str, MultiBitRule] = field(default_factory=dict)  # quantizer name -> its multi-bit rule
    bns: dict[str, SwitchableBatchNorm] = field(default_factory=dict)  # module name -> switchable BN
    fixed: list[str] = field(default_factory=list)  # quantizers of the first and last layer (not switched)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def block_of_modules(gm: fx.GraphModule) -> tuple[dict[str, int], list[list[str]]]:
    """Module name -> block index, over the reconstruction partition's units (``block`` granularity); a layer's
    weight quantizer belongs to its layer's block."""
    units = partition(gm, "block")
    where: dict[str, int] = {}
    blocks: list[list[str]] = []
    for i, u in enumerate(units):
        names = [str(n.target) for n in u.nodes if n.op == "call_module"]
        for n in names:
            where.setdefault(n, i)
        blocks.append(names)
    modules = dict(gm.named_modules())
    for name, m in modules.items():
        if isinstance(m, QuantWeighted) and m.weight_quantizer is not None and name in where:
            where[f"{name}.weight_quantizer"] = where[name]
    return where, blocks


def make_switchable(gm: fx.GraphModule, bits: tuple[int, ...], build: Callable[[LearningRule], RuleBuilder],
                    options: BaseModel) -> Switched:
    """Give every learning quantizer of a QAT-prepared graph one rule per bit-width in ``bits`` and every
    BatchNorm one copy per bit-width, except the quantizers of the first and last layer.

    ``build(rule)`` returns the builder of ``rule``'s algorithm at a given context. Starts at the highest bit-width.
    """
    if any(isinstance(m, QuantWeighted) and m.bn is not None for m in gm.modules()):
        raise ConfigError("CoQuant switches BatchNorm per bit-width, so BN must stay unfolded (the academic "
                          "setting); this backend folds BN into the weights")
    where, blocks = block_of_modules(gm)
    state = BitState(tuple(bits), len(blocks))
    layers = list_layers(gm)
    edge = {layers[0].name, layers[-1].name} if layers else set()
    fixed = {f"{n}.weight_quantizer" for n in edge} | {li.input_quantizer for li in layers if li.name in edge}
    out = Switched(state, blocks)
    names = {id(m): n for n, m in gm.named_modules()}
    for q in all_quantizers(gm):
        name = names[id(q)]
        if q.rule is None or q.name in fixed or name in fixed:
            out.fixed.append(q.name)
            continue
        rule = q.rule
        q.rule = MultiBitRule(rule.ctx, options, state, where.get(name, 0), build(rule), state.trained, init=rule)
        out.rules[q.name] = q.rule
    for name, m in list(gm.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            sbn = SwitchableBatchNorm(m, state.trained, state, where.get(name, 0))
            _set(gm, name, sbn)
            out.bns[name] = sbn
    gm.meta.setdefault("quantbench", {})["coquant"] = {"bits": list(state.trained), "blocks": len(blocks)}
    return out


@torch.no_grad()
def add_bits(gm: fx.GraphModule, sw: Switched, bits: int, loader: Any, device: torch.device | str = "cpu",
             ranges: str = "linear") -> int:
    """Make ``gm`` run at an unseen bit-width: a quantizer per switched tensor, its clipping range started by
    ``ranges`` (:data:`ZERO_SHOT_RANGES`), and a fresh BatchNorm per layer (affine parameters of the nearest
    trained bit-width) calibrated on ``loader``'s images (seed 002 Table 3, zero-shot testing with BN calibration;
    seed 001 C.3's procedure). Returns the images used."""
    if bits in sw.state.trained or any(bits in sbn.bits for sbn in sw.bns.values()):
        raise ConfigError(f"the network already runs at {bits} bits (trained: {list(sw.state.trained)})")
    like = nearest_trained(sw.state.trained, bits)
    for rule in sw.rules.values():
        if str(bits) not in rule.rules:
            rule.add_bits(bits, rule.at(like), start_range(rule, bits, sw.state.trained, ranges))
    fresh = [sbn.add_bits(bits, like) for sbn in sw.bns.values()]
    return _calibrate(gm, sw, bits, fresh, loader, device)


@torch.no_grad()
def recalibrate_bits(gm: fx.GraphModule, sw: Switched, bits: int, loader: Any,
                     device: torch.device | str = "cpu") -> int:
    """Re-estimate the running statistics of ``bits``' BatchNorms on ``loader`` (seed 001 C.3): after a short
    training their momentum-averaged statistics still lag the weights. Returns the images used."""
    return _calibrate(gm, sw, bits, [sbn.at(bits) for sbn in sw.bns.values()], loader, device)


def _calibrate(gm: fx.GraphModule, sw: Switched, bits: int, fresh: list[nn.modules.batchnorm._BatchNorm],
               loader: Any, device: torch.device | str) -> int:
    """Cumulative BN statistics of ``fresh`` over ``loader`` with the network at ``bits`` (the rest in eval mode)."""
    with sw.state.at(bits):
        n = estimate_bn_statistics(gm, loader, device, fresh)
    if n == 0:
        raise ConfigError("the BN calibration set is empty: give at least one image")
    return n


def freeze_at(gm: fx.GraphModule, bits: int) -> fx.GraphModule:
    """A copy of ``gm`` fixed at ``bits``: every multi-bit rule replaced by its rule at ``bits`` and every switchable
    BatchNorm by that bit-width's, so the copy is an ordinary QAT graph (for export, ``bake`` and PTQ tools)."""
    out = copy.deepcopy(gm)
    for name, m in list(out.named_modules()):
        if isinstance(m, SwitchableBatchNorm):
            _set(out, name, m.at(bits))
    for q in all_quantizers(out):
        if isinstance(q.rule, MultiBitRule):  # the quantizer takes the bit-width too (cards, size, export read it)
            q.rule = rule = q.rule.at(bits)
            q.scheme = q.scheme.with_bits(bits)
            q.qrange_t.copy_(torch.tensor([rule.qmin, rule.qmax]))
    out.meta.setdefault("quantbench", {}).pop("coquant", None)
    out.recompile()
    return out
