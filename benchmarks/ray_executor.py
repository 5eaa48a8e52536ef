"""The Ray executor against the local runner on this machine: the same leaderboard, and what Ray costs.

1. ``one``: a one-run sweep (the sweep's first run), serial local runner vs Ray (a local Ray instance started by
   the call, as ``quantbench bench --executor ray`` does): wall seconds of the whole call and of the run itself.
2. ``sweep``: the whole sweep on the local pool (``--workers`` processes) and on Ray (as many runs at once as
   the cores), one torch thread per run in both; the stores' records compared run by run.

    python benchmarks/ray_executor.py                                   # examples/resnet20_w8a8.yaml, 2 workers
    python benchmarks/ray_executor.py --sections one --sweep examples/digits_small.yaml
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from _common import ROOT, print_table, write_json
from quantbench.cli.bench import run_sweep_file
from quantbench.store import open_store, resolve_store_url


def bench(sweep: Path, out: Path, executor: str, workers: int = 1) -> float:
    """Wall seconds of one ``quantbench bench`` call (the leaderboard printed to a recording console)."""
    t0 = time.perf_counter()
    code = run_sweep_file(sweep, out, None, workers if executor == "local" else 1, "refuse", False, False,
                          Console(file=io.StringIO(), width=200), threads=1, executor=executor)
    if code:
        raise SystemExit(f"bench {sweep} on {executor} exited with {code}")
    return time.perf_counter() - t0


def records(out: Path) -> dict[str, dict[str, Any]]:
    with open_store(resolve_store_url(None, out), create=False) as store:
        return {r.run_id: {"status": r.status, "quant_top1": r.quant_top1, "agreement": r.agreement,
                           "size": r.model_size_bytes, "run_s": r.wall_seconds,
                           "label": f"{r.backend} {r.method_label}"} for r in store.query()}


def first_run_sweep(sweep: Path, folder: Path) -> Path:
    """A copy of ``sweep`` with one backend and one method (its first run), next to the original (same paths)."""
    import yaml

    data = yaml.safe_load(sweep.read_text())
    data["name"] = f"{data['name']}-one"
    data["backends"] = [data["backends"][0]] if isinstance(data.get("backends"), list) else ["tensorrt"]
    data["methods"] = data["methods"][:1]
    data["bits"] = data.get("bits", ["W8A8"])[:1]
    data["seeds"] = data.get("seeds", [0])[:1]
    path = sweep.parent / f".{sweep.stem}-one.yaml"  # beside the original: its relative paths still hold
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, default=ROOT / "examples" / "resnet20_w8a8.yaml")
    ap.add_argument("--sections", default="one,sweep")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="qb-ray-"))
    result: dict[str, Any] = {"sweep": str(args.sweep), "workers": args.workers}
    try:
        if "one" in args.sections:
            one = first_run_sweep(args.sweep, work)
            try:
                local_s, ray_s = bench(one, work / "one-local", "local"), bench(one, work / "one-ray", "ray")
            finally:
                one.unlink()
            lr, rr = records(work / "one-local"), records(work / "one-ray")
            run_id = next(iter(lr))
            result["one"] = {"label": lr[run_id]["label"], "local_call_s": round(local_s, 2),
                             "ray_call_s": round(ray_s, 2), "ratio": round(ray_s / local_s, 2),
                             "local_run_s": round(lr[run_id]["run_s"], 2), "ray_run_s": round(rr[run_id]["run_s"], 2),
                             "same_record": {k: v for k, v in lr[run_id].items() if k != "run_s"} ==
                             {k: v for k, v in rr[run_id].items() if k != "run_s"}}
            print_table("One run: local runner vs Ray (seconds)", list(result["one"]), [list(result["one"].values())])
        if "sweep" in args.sections:
            local_s = bench(args.sweep, work / "local", "local", args.workers)
            ray_s = bench(args.sweep, work / "ray", "ray")
            lr, rr = records(work / "local"), records(work / "ray")
            differ = [k for k in lr if {a: b for a, b in lr[k].items() if a != "run_s"} !=
                      {a: b for a, b in rr.get(k, {}).items() if a != "run_s"}]
            result["sweep"] = {"runs": len(lr), "local_pool_s": round(local_s, 1), "ray_s": round(ray_s, 1),
                               "ratio": round(ray_s / local_s, 2), "identical_records": not differ and
                               set(lr) == set(rr), "differing": differ}
            print_table(f"Whole sweep: local pool ({args.workers} workers) vs Ray (seconds)", list(result["sweep"]),
                        [list(result["sweep"].values())])
            result["leaderboard"] = sorted(({"run_id": k, **v} for k, v in rr.items()),
                                           key=lambda r: -(r["quant_top1"] or 0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json("ray_executor", result, args.out)


if __name__ == "__main__":
    main()
