"""Every registered model x every backend spec prepares, calibrates on 2 random batches and runs quantized.

The whole grid (17 models x 7 backends) takes about 45 s on one core, so all of it runs by default.
"""

from __future__ import annotations

import pytest
import torch

from quantbench.backends import backend_names, load_backend
from quantbench.graph.quantize import all_quantizers, list_layers, prepare, set_quantizing
from quantbench.models import MODELS, build_model, get_entry
from quantbench.ptq.calibrate import calibrate

GRID = [pytest.param(m, b, id=f"{m}-{b}") for m in MODELS.names() for b in backend_names()]


def _input(name: str) -> tuple[int, int, int]:
    c, h, w = get_entry(name).input_size
    return (c, min(h, 32), min(w, 32))  # small inputs: every registered model runs at 32x32


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_grid_covers_both_placements_and_arithmetics():
    specs = [load_backend(b) for b in backend_names()]
    assert {s.placement.mode for s in specs} == {"inputs", "outputs"}
    assert {s.arithmetic for s in specs} == {"fake_quant", "onnxruntime", "torch-x86", "torch-qnnpack"}


@pytest.mark.parametrize(("model_name", "backend"), GRID)
def test_every_model_on_every_backend_prepares_calibrates_and_runs(model_name: str, backend: str) -> None:
    check_prepares_calibrates_and_runs(model_name, backend, _input(model_name))


def check_prepares_calibrates_and_runs(model_name: str, backend: str, shape: tuple[int, ...]) -> None:
    """Prepare ``model_name`` (10 classes) for ``backend``, calibrate on 2 random batches of ``shape``, run it
    quantized: finite logits, every quantizer calibrated, every weighted layer listed."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10)
    batches = [(torch.randn(2, *shape), torch.zeros(2, dtype=torch.long)) for _ in range(2)]
    gm = prepare(model, load_backend(backend), batches[0][0][:1])
    calibrate(gm, batches, progress=False)
    set_quantizing(gm, True)
    with torch.no_grad():
        out = gm(batches[0][0])
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    quantizers = list(all_quantizers(gm))
    assert quantizers and all(q.calibrated for q in quantizers)
    assert len(list_layers(gm)) == len(gm.meta["quantbench"]["weighted_layers"])
