"""Sweeps on Ray (a local Ray instance started here, no cluster): the same records as the local runner, a
killed Ray worker gives one failed run, and what the cluster cannot run is refused up front. Also the local
runner's GPU pinning (pure logic, no GPU needed)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantbench.cli.main import app
from quantbench.errors import ConfigError
from quantbench.store import open_store, resolve_store_url
from quantbench.sweep.execute import init_worker
from quantbench.sweep.expand import expand
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.ray_executor import RAY_WORKER_DIED, absolute, check_cluster, needed_paths
from quantbench.sweep.runner import ExecutorOptions, run_jobs, visible_gpus
from quantbench.sweep.sink import StoreSink
from tests.conftest import service_missing
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)

BACKENDS = ["tensorrt", "academic", "fbgemm"]
TIMING = ("seconds", "wall", "timestamp", "finished", "started", "host", "fraction_of_epoch")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[object]:
    """A local Ray instance with 2 CPUs for this module (started once: about 6 s)."""
    try:
        import ray
    except ImportError:
        service_missing("ray", "Ray is not installed (pip install 'quantbench[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _jobs(tmp_path: Path, **kw):
    return expand(parse_sweep(tiny_sweep("ray", backends=BACKENDS, bits=["W8A8", "W4A8"], **kw), tmp_path)).jobs


def _run(jobs, folder: Path, executor: str):
    with open_store(resolve_store_url(None, folder)) as store:
        summary = run_jobs(jobs, StoreSink(store, folder / "cards"), progress=False, executor=executor,
                           options=ExecutorOptions(threads=1))
        return summary, {r.run_id: r for r in store.query()}


def _stable(value):
    """A card or metrics dict without the fields that differ between any two runs (times, host, process)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not any(t in k for t in TIMING) and k != "environment"}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_sweep_stores_the_same_records_as_the_local_runner(tmp_path, ray_local):
    jobs = _jobs(tmp_path)
    assert len(jobs) == 6
    local, local_rows = _run(jobs, tmp_path / "local", "local")
    on_ray, ray_rows = _run(jobs, tmp_path / "ray", "ray")
    assert local.done == on_ray.done == 6 and on_ray.failed == 0
    assert set(ray_rows) == set(local_rows) == {j.run_id for j in jobs}
    for run_id, row in ray_rows.items():
        ref = local_rows[run_id]
        assert (row.status, row.quant_top1, row.agreement, row.fp_top1, row.model_size_bytes) == \
            (ref.status, ref.quant_top1, ref.agreement, ref.fp_top1, ref.model_size_bytes)
        assert row.config == ref.config and _stable(row.metrics) == _stable(ref.metrics)
        assert _stable(row.card) == _stable(ref.card)
    assert sorted(p.name for p in (tmp_path / "ray" / "cards").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "cards").iterdir())


@pytest.mark.ray
@pytest.mark.fault(input="`quantbench bench --executor ray`: a run's Ray worker process is killed (SIGKILL)",
                   message="the run is stored as failed: its Ray worker or node died while running it",
                   exit_code=1, kept="every other run, done; the sweep goes on")
def test_a_killed_ray_worker_gives_one_failed_run_and_the_rest_done(tmp_path, ray_local):
    jobs = _jobs(tmp_path, methods=[{"kind": "fault_test", "calibrator": "minmax", "calib_size": 32,
                                     "faults": {"academic": "kill"}}])
    jobs = [j for j in jobs if j.config["backend"] != "academic" or j.config["w_bits"] == 8]
    summary, rows = _run(jobs, tmp_path, "ray")
    assert summary.done == 4 and summary.failed == 1
    dead = [r for r in rows.values() if r.status == "failed"]
    assert len(dead) == 1 and dead[0].backend == "academic" and RAY_WORKER_DIED in (dead[0].error or "")


@pytest.mark.ray
def test_a_node_that_cannot_see_the_files_and_gpu_runs_without_gpus_are_refused(tmp_path, ray_local):
    job = _jobs(tmp_path)[0].with_config(weights=str(tmp_path / "nowhere.safetensors"),
                                         data=f"cifar10:{tmp_path / 'no-data'}")
    with pytest.raises(ConfigError, match=r"Ray node .* cannot see .*nowhere.safetensors.*same path on every node"):
        check_cluster(ray_local, [job], 1.0)
    with pytest.raises(ConfigError, match="has no GPU"):
        check_cluster(ray_local, [_jobs(tmp_path)[0].with_config(device="cuda")], 1.0)
    with pytest.raises(ConfigError, match="largest Ray node has 2"):
        check_cluster(ray_local, _jobs(tmp_path), 3.0)
    assert check_cluster(ray_local, _jobs(tmp_path), 1.0) == 2  # two runs at once on 2 CPUs


def test_relative_paths_are_made_absolute_for_the_nodes_and_the_identity_is_kept(tmp_path):
    job = _jobs(tmp_path)[0].with_config(weights="models/w.safetensors", data="imagefolder:data/val?skip_unreadable")
    shipped = absolute(job, Path("/shared/project"))
    assert shipped.config["weights"] == "/shared/project/models/w.safetensors"
    assert shipped.config["data"] == "imagefolder:/shared/project/data/val?skip_unreadable"
    assert shipped.run_id == job.run_id and shipped.identity == job.identity
    assert needed_paths([shipped]) == ["/shared/project/data/val", "/shared/project/models/w.safetensors"]
    assert absolute(job.with_config(weights=None, data="digits"), Path("/x")).config["data"] == "digits"


def test_bench_refuses_options_of_the_other_executor_and_names_the_ray_extra(tmp_path, monkeypatch):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: x\nmodels: [{model: digits_cnn, weights: null, data: digits}]\nmethods: [{kind: ptq}]\n")
    runner = CliRunner()
    res = runner.invoke(app, ["bench", str(sweep), "--out", str(tmp_path / "o"), "--address", "auto"])
    assert res.exit_code == 2 and "--address and --cpus-per-run are for --executor ray" in res.output
    res = runner.invoke(app, ["bench", str(sweep), "--out", str(tmp_path / "o"), "--executor", "ray", "--workers", "2"])
    assert res.exit_code == 2 and "--workers is for the local executor" in res.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    res = runner.invoke(app, ["bench", str(sweep), "--out", str(tmp_path / "o"), "--executor", "ray"])
    assert res.exit_code == 2 and "pip install 'quantbench[ray]'" in res.output
    assert not (tmp_path / "o").exists()  # refused before any work


def test_local_workers_are_pinned_one_gpu_each_round_robin(tmp_path, monkeypatch):
    jobs = _jobs(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus(jobs) == []  # cpu runs: no pinning
    cuda = [j.with_config(device="cuda") for j in jobs]
    assert visible_gpus(cuda) == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert visible_gpus(cuda) == []  # one GPU: nothing to spread
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    for _ in range(3):  # three workers starting in turn
        init_worker(1, counter, None, ["2", "5"])
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["2", "5", "2"]
