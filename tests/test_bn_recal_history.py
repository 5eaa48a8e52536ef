"""BN re-calibration on a model with training history (issue 17).

The shared checkpoints have ``num_batches_tracked = 0``, so a cumulative average (``momentum=None``)
that forgot ``reset_running_stats()`` still overwrote the old statistics on its first batch and every
test passed. Here the BNs have been trained (``num_batches_tracked > 0``, running statistics far from
the calibration data's): the re-calibrated statistics must equal the calibration set's, computed in
float64 from exactly what each BN saw.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantbench.backends import load_backend
from quantbench.graph.quantize import prepare, set_quantizing
from quantbench.models import build_model
from quantbench.ptq import bn_recalibrate, calibrate

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _with_training_history(model: nn.Module, steps: int = 7) -> nn.Module:
    """Forward passes in train mode on data unlike the calibration set: running stats move far from it
    and ``num_batches_tracked`` = ``steps``."""
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(16, 3, 32, 32, generator=g) * 3.0 + 1.5)
    return model.eval()


@pytest.mark.parametrize(("backend", "quantized"), [("academic", True), ("tensorrt", False)])
def test_bn_recalibration_replaces_trained_statistics_by_the_calibration_sets(backend, quantized):
    model = _with_training_history(build_model("resnet20_cifar"))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 7 for m in bns)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(24, 3, 32, 32, generator=g) for _ in range(3)]
    gm = prepare(model, load_backend(backend).configure(w_bits=8, a_bits=8), batches[0][:1], "minmax", "minmax")
    calibrate(gm, [(b, None) for b in batches], progress=False)
    set_quantizing(gm, quantized)

    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name, m in gm.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def pre(mod, inp, name=name):
                x = inp[0].detach().double()
                seen.setdefault(name, []).append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)))
            hooks.append(m.register_forward_pre_hook(pre))
    old = {n: m.running_mean.clone() for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_recalibrate(gm, [(b, None) for b in batches], progress=False) == 19
    for h in hooks:
        h.remove()

    assert len(seen) == 19
    for name, m in gm.named_modules():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        assert len(seen[name]) == len(batches)
        # seed 001 C.3: the average over the calibration batches of each batch's mean / unbiased variance
        mean = torch.stack([mu for mu, _ in seen[name]]).mean(0)
        var = torch.stack([v for _, v in seen[name]]).mean(0)
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(old[name], m.running_mean, atol=1e-3)  # the history really differed
