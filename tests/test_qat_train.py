"""QAT training: exact resume, refusing a foreign checkpoint, stopping on NaN, DDP = one process, bf16, data."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantbench.data import TensorImageDataset
from quantbench.qat.checkpoint import ResumeMismatchError, load_checkpoint
from quantbench.qat.config import QATConfig, load_qat_config
from quantbench.qat.data import TrainBatches
from quantbench.qat.diagnostics import DivergenceError
from quantbench.qat.distributed import DistContext
from quantbench.qat.pipeline import make_trainer, prepare_run
from quantbench.qat.prepare import qat_quantizers

ONE = DistContext(0, 1, torch.device("cpu"))


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Small models train faster single-threaded on a busy machine (and bit-for-bit reproducibly)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def config(out: Path, **kw: Any) -> QATConfig:
    base = {"model": "digits_cnn", "data": "digits", "backend": "fbgemm", "w_bits": 4, "a_bits": 4,
            "algorithm": "lsq+", "bn_fold": 2, "bn_freeze_step": 5, "epochs": 2, "batch_size": 64,
            "max_train": 256, "max_test": 64, "calib_size": 64, "log_every": 2, "lr": 0.02, "out_dir": str(out)}
    return load_qat_config(None, {**base, **kw})


def train(cfg: QATConfig, resume: bool = False, ctx: DistContext = ONE) -> dict[str, torch.Tensor]:
    run = prepare_run(cfg, ctx, progress=False)
    make_trainer(cfg, run, ctx, progress=False).fit(resume)
    return run.gm.state_dict()


def test_resume_continues_to_the_same_result_as_an_uninterrupted_run(tmp_path: Path) -> None:
    full = train(config(tmp_path / "a"))
    first = config(tmp_path / "b", epochs=2)
    run = prepare_run(first, ONE, progress=False)
    trainer = make_trainer(first, run, ONE, progress=False)
    save = trainer.save

    def crash_after_first_epoch() -> None:
        save()
        raise KeyboardInterrupt

    trainer.save = crash_after_first_epoch  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    resumed = train(first, resume=True)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k

    def events(path: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]

    assert events(tmp_path / "b" / "log.jsonl") == events(tmp_path / "a" / "log.jsonl")
    with pytest.raises(ResumeMismatchError, match=r"lr: 0.02 \(checkpoint\) vs 0.03"):
        train(config(tmp_path / "b", lr=0.03), resume=True)


def test_nan_loss_stops_names_the_quantizer_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = config(tmp_path, epochs=1)
    run = prepare_run(cfg, ONE, progress=False)
    make_trainer(cfg, run, ONE, progress=False).fit()
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    cfg2 = config(tmp_path, epochs=1).model_copy(update={"epochs": 2})
    trainer = make_trainer(cfg2, run, ONE, progress=False)
    name, q = next((n, q) for n, q in qat_quantizers(run.gm) if n.endswith("conv2_post"))
    trainer.resume = lambda: True  # type: ignore[method-assign]  (continue in memory from epoch 1)
    trainer.epoch, trainer.step = 1, 4
    with torch.no_grad():
        q.scale.fill_(float("nan"))
    with pytest.raises(DivergenceError, match=rf"{name}.*diverged.*after epoch 1"):
        trainer.fit(resume=True)
    assert ckpt.read_bytes() == before
    assert '"event": "diverged"' in (tmp_path / "log.jsonl").read_text()


def test_bf16_autocast_trains_from_the_paper_init(tmp_path: Path) -> None:
    cfg = config(tmp_path, epochs=1, amp="bf16", algorithm="lsq", bn_fold=3, init="paper")
    run = prepare_run(cfg, ONE, progress=False)
    out = make_trainer(cfg, run, ONE, progress=False).fit()
    losses = [r["loss"] for r in out.history if r["event"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_process_batches_union_is_the_single_process_batch() -> None:
    images = torch.arange(40 * 3 * 4 * 4, dtype=torch.float32).reshape(40, 3, 4, 4)
    ds = TensorImageDataset(images, torch.arange(40), pad=1)
    one = list(TrainBatches(ds, 8, 1, 0, seed=3).epoch(2))
    two = [list(TrainBatches(ds, 8, 2, r, seed=3).epoch(2)) for r in (0, 1)]
    assert len(one) == len(two[0]) == 5
    for k, (x, y) in enumerate(one):
        x2 = torch.cat([two[0][k][0], two[1][k][0]])
        y2 = torch.cat([two[0][k][1], two[1][k][1]])
        order = torch.argsort(y2)
        torch.testing.assert_close(x2[order], x[torch.argsort(y)])


# ----------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, out: str, cfg_json: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = QATConfig.model_validate_json(cfg_json)
        ctx = DistContext(rank, world, torch.device("cpu"))
        state = train(cfg, ctx=ctx)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path: Path) -> None:
    # BN folded once (strategy 0): no batch statistics, which differ per process without SyncBatchNorm
    cfg = config(tmp_path / "ddp", algorithm="lsq", bn_fold=0, epochs=1, bn_freeze_step=None)
    single = train(cfg.model_copy(update={"out_dir": str(tmp_path / "one")}))
    out = tmp_path / "ddp.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(out), cfg.model_dump_json()), nprocs=2,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + 150
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.terminate()
            pytest.fail("the 2-process DDP run did not finish in 150 s (deadlock?)")
    ddp = torch.load(out, weights_only=True)
    for k, v in single.items():
        if v.is_floating_point():
            torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)
