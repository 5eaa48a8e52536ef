"""Median QAT training-step time of torchvision ResNet-18, and the LSQ fake quantizer's memory bandwidth.

Rows: FP, quantbench LSQ W4A4 (op by op and ``--fused``) and W8A8 (TensorRT setting, BN strategy 3), PyTorch's
own ``prepare_qat_fx`` (x86 QAT qconfig), each in fp32 and under bf16 autocast (a row that fails says why). Then
the forward +
backward of the LSQ fake quantizer on one large tensor as a fraction of a device copy's bandwidth (bytes:
copy 8/element; fake quant 20/element: read x, write y, read dy and x, write dx), beside torch's built-in
learnable fake quant. The ``--fused`` kernels are ``torch.compile``'s (C++ on CPU, Triton on CUDA); their compile
time is in the warm-up, not in the medians.

    python benchmarks/qat_step.py --device cpu --batch 8 --size 64        # CPU, small
    python benchmarks/qat_step.py --device cuda --batch 256 --size 224    # the issue's GPU setting
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _common import median_time, print_table, write_json
from quantbench.backends import load_backend
from quantbench.graph.quantize import prepare
from quantbench.models import build_model
from quantbench.ptq import calibrate
from quantbench.qat.prepare import prepare_qat, set_fused_kernels
from quantbench.qat.quantizers.lsq_kernel import lsq_fake_quant


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, device: str) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        sync(device)

    return step


def lsq_model(base: nn.Module, x: torch.Tensor, bits: int, fused: bool = False) -> nn.Module:
    spec = load_backend("tensorrt").configure(w_bits=bits, a_bits=bits)
    gm = prepare(base, spec, x[:1], "minmax", "minmax")
    calibrate(gm, [x], x.device, progress=False)
    gm = prepare_qat(gm, "lsq", 3)
    set_fused_kernels(gm, fused)
    return gm


def torch_qat_model(base: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(copy.deepcopy(base).train(), get_default_qat_qconfig_mapping("x86"), (x[:1],))


def bandwidth(device: str, n: int, repeats: int) -> dict[str, Any]:
    """Forward + backward of LSQ (and torch's learnable fake quant) vs a copy, on ``n`` float32 elements."""
    x = torch.randn(n, device=device)
    out = torch.empty_like(x)
    t_copy = median_time(lambda: (out.copy_(x), sync(device)), repeats, warmup=2)
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    s = torch.nn.Parameter(torch.tensor([0.05], device=device))
    z = torch.zeros(1, device=device)
    fac = 1.0 / (n * 7) ** 0.5

    def ours(fused: bool = False) -> None:
        lsq_fake_quant(xg, s, z, -8, 7, fac, None, False, True, fused).backward(g)
        sync(device)

    def builtin() -> None:
        torch._fake_quantize_learnable_per_tensor_affine(xg, s, z, -8, 7, fac).backward(g)
        sync(device)

    t_ours = median_time(ours, repeats, warmup=2)
    t_fused = median_time(lambda: ours(True), repeats, warmup=2)
    t_builtin = median_time(builtin, repeats, warmup=2)

    def frac(t: float) -> float:
        return t_copy * 20 / 8 / t

    return {"elements": n, "copy_ms": 1e3 * t_copy, "copy_GBps": 8 * n / t_copy / 1e9,
            "lsq_ms": 1e3 * t_ours, "lsq_fraction_of_copy": frac(t_ours),
            "lsq_fused_ms": 1e3 * t_fused, "lsq_fused_GBps": 20 * n / t_fused / 1e9,
            "lsq_fused_fraction_of_copy": frac(t_fused),
            "torch_builtin_ms": 1e3 * t_builtin, "torch_builtin_fraction_of_copy": frac(t_builtin)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--elements", type=int, default=None,
                    help="fake-quant bandwidth tensor (default 2^22 CPU, 2^26 GPU)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    torch.manual_seed(0)
    base = build_model("resnet18").to(dev)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    builders: dict[str, Callable[[], nn.Module]] = {
        "FP": lambda: copy.deepcopy(base),
        "quantbench LSQ W4A4": lambda: lsq_model(base, x, 4),
        "quantbench LSQ W4A4 fused": lambda: lsq_model(base, x, 4, fused=True),
        "quantbench LSQ W8A8": lambda: lsq_model(base, x, 8),
        "PyTorch prepare_qat_fx W8A8": lambda: torch_qat_model(base, x),
    }
    rows, results = [], []
    fp_ms: dict[bool, float] = {}
    for name, build in builders.items():
        for bf16 in (False, True):
            t0 = time.perf_counter()
            try:
                ms = 1e3 * median_time(step_fn(build().to(dev), x, y, bf16, dev), args.repeats, warmup=2)
                err = ""
            except Exception as exc:  # a failing configuration is a result (PyTorch QAT under bf16)
                ms, err = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            if name == "FP":
                fp_ms[bf16] = ms
            ratio = ms / fp_ms[bf16] if fp_ms.get(bf16) else float("nan")
            prec = "bf16 autocast" if bf16 else "fp32"
            rows.append([name, prec, ms, ratio, err or "ok"])
            results.append({"variant": name, "precision": prec, "step_ms": ms, "vs_fp": ratio, "error": err,
                            "wall_s": time.perf_counter() - t0})
    title = f"QAT step, torchvision ResNet-18, batch {args.batch}, {args.size}x{args.size}, {dev}"
    print_table(title, ["variant", "precision", "median step ms", "x FP (same precision)", "status"], rows)
    n = args.elements or (2**26 if dev == "cuda" else 2**22)
    bw = bandwidth(dev, n, max(args.repeats, 5))
    print_table(f"LSQ fake quant fwd+bwd bandwidth ({n} float32 elements, {dev})",
                ["kernel", "ms", "fraction of copy bandwidth"],
                [["copy", bw["copy_ms"], 1.0], ["quantbench LSQ", bw["lsq_ms"], bw["lsq_fraction_of_copy"]],
                 ["quantbench LSQ fused (torch.compile)", bw["lsq_fused_ms"], bw["lsq_fused_fraction_of_copy"]],
                 ["torch learnable fake quant", bw["torch_builtin_ms"], bw["torch_builtin_fraction_of_copy"]]])
    path = write_json("qat_step", {"args": vars(args) | {"out": str(args.out)}, "steps": results, "bandwidth": bw},
                      args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
