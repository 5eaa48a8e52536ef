"""The report's synthetic-data section: for each generated set the runs used, a grid of its images and its
loss curve (read from the set's cache entry, :mod:`quantbench.datafree.source`)."""

from __future__ import annotations

import base64
import json
import math
from html import escape
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from quantbench.store import RunRow


def _sets(rows: list[RunRow]) -> dict[str, dict[str, Any]]:
    """Distinct generated sets (by identity) with the model they were made for and the runs that used them."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        gen = ((r.card or {}).get("resource_complexity") or {}).get("data_generation")
        if not gen or not gen.get("identity"):
            continue
        entry = out.setdefault(gen["identity"], {"facts": gen, "model": r.model, "runs": []})
        entry["runs"].append(r.run_id)
    return out


def image_grid(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...], n: int = 32) -> bytes:
    """The first ``n`` images, de-normalised, as a PNG grid."""
    from quantbench.report.plots import _grid, _png

    x = images[:n].float()
    m = torch.tensor(mean).reshape(1, -1, 1, 1)
    s = torch.tensor(std).reshape(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    cols = min(8, x.shape[0])
    rows = math.ceil(x.shape[0] / cols)
    fig, _ = _grid(1, width=cols * 0.9, height=rows * 0.9)
    fig.clf()
    for i in range(x.shape[0]):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = x[i].permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.axis("off")
    return _png(fig)


def loss_curve(curve: list[float], title: str) -> bytes:
    """The generator's loss per step (mean over batches), log scale."""
    from quantbench.report.plots import _grid, _png

    fig, axes = _grid(1, width=5.0, height=3.0)
    ax = axes[0]
    ax.plot(range(1, len(curve) + 1), curve)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (mean over batches)")
    ax.set_title(title)
    return _png(fig)


def synthetic_section(rows: list[RunRow]) -> str:
    """HTML for every generated set the runs used ('' when none did)."""
    sets = _sets(rows)
    if not sets:
        return ""
    from quantbench.datafree.source import cache_dir
    from quantbench.models import MODELS

    parts = ['<section id="synthetic"><h2>Synthetic data</h2><p class="muted">Images the runs calibrated or '
             "reconstructed on instead of real data, made from the float model's BatchNorm statistics (or noise).</p>"]
    for ident, s in sets.items():
        f = s["facts"]
        head = (f"{escape(str(f.get('type')))}: {f.get('images')} images for {escape(str(s['model']))}, "
                f"{f.get('real_images_used', 0)} real images used, generated in {f.get('generation_seconds')} s; "
                f"{len(s['runs'])} run(s)")
        parts.append(f"<h3>{head}</h3>")
        path = cache_dir() / f"{ident}.safetensors"
        if not path.is_file():
            parts.append(f'<p class="muted">The set ({escape(ident)}) is not in this machine\'s cache '
                         f"({escape(str(cache_dir()))}), so its images are not shown.</p>")
            continue
        images = load_file(str(path))["images"]
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        mean, std = (MODELS.get(s["model"]).mean, MODELS.get(s["model"]).std) if s["model"] in MODELS else (
            (0.0,) * images.shape[1], (1.0,) * images.shape[1])
        grid = base64.b64encode(image_grid(images, mean, std)).decode("ascii")
        parts.append(f'<figure><img alt="generated images" src="data:image/png;base64,{grid}">'
                     "<figcaption>The first 32 images, de-normalised.</figcaption></figure>")
        curve = meta.get("loss_curve") or []
        if curve:
            png = base64.b64encode(loss_curve(curve, str(f.get("type")))).decode("ascii")
            parts.append(f'<figure><img alt="loss curve" src="data:image/png;base64,{png}">'
                         "<figcaption>The generator's loss (BN statistics and its other terms) per step.</figcaption>"
                         "</figure>")
    parts.append("</section>")
    return "".join(parts)
