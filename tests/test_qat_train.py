"""QAT training: exact resume, refusing a foreign checkpoint, stopping on NaN, DDP = one process, bf16, data."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantbench.data import TensorImageDataset
from quantbench.qat.checkpoint import ResumeMismatchError, load_checkpoint, save_checkpoint
from quantbench.qat.config import QATConfig, load_qat_config
from quantbench.qat.data import TrainBatches
from quantbench.qat.diagnostics import DivergenceError, DivergenceWarning
from quantbench.qat.distributed import DistContext
from quantbench.qat.pipeline import make_trainer, prepare_run
from quantbench.qat.prepare import qat_quantizers
from quantbench.qat.train import TrainOutcome
from quantbench.sweep.weights import ensure_trained

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


def train_outcome(cfg: QATConfig) -> TrainOutcome:
    run = prepare_run(cfg, ONE, progress=False)
    return make_trainer(cfg, run, ONE, progress=False).fit()


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


@pytest.mark.fault(input="QAT whose last epoch checkpoint holds NaN weights, then a NaN loss",
                   message="Training stopped; there is no good checkpoint: OUT/checkpoint.pt (after epoch 1) holds "
                           "non-finite weights ('...')", exit_code=2, kept="the checkpoint, not called good")
def test_a_checkpoint_with_nan_weights_is_not_called_good(tmp_path: Path) -> None:
    cfg = config(tmp_path, epochs=1)
    run = prepare_run(cfg, ONE, progress=False)
    make_trainer(cfg, run, ONE, progress=False).fit()
    ckpt_path = tmp_path / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    weight = next(k for k in ckpt["model"] if k.endswith("weight"))
    ckpt["model"][weight].fill_(float("nan"))  # e.g. written by an earlier version that did not check
    save_checkpoint(ckpt_path, {k: v for k, v in ckpt.items() if k != "format"})
    trainer = make_trainer(cfg.model_copy(update={"epochs": 2}), run, ONE, progress=False)
    trainer.resume = lambda: True  # type: ignore[method-assign]
    trainer.epoch, trainer.step = 1, 4
    q = next(q for n, q in qat_quantizers(run.gm) if n.endswith("conv2_post"))
    with torch.no_grad():
        q.scale.fill_(float("nan"))
    with pytest.raises(DivergenceError, match=rf"there is no good checkpoint: .*after epoch 1.*non-finite.*{weight}"):
        trainer.fit(resume=True)


@pytest.mark.fault(input="QAT weights that turn NaN by an epoch's end", exit_code=2, kept="the previous checkpoint",
                   message="after epoch N the weights are not finite ('...'); its checkpoint was not written")
def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path: Path) -> None:
    cfg = config(tmp_path, epochs=1)
    run = prepare_run(cfg, ONE, progress=False)
    trainer = make_trainer(cfg, run, ONE, progress=False)
    trainer.fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    layer = next(m for m in run.gm.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = float("inf")
    trainer.epoch = 2
    with pytest.raises(DivergenceError, match=r"after epoch 2 the weights are not finite.*checkpoint was not "
                                              r"written.*last good checkpoint \(after epoch 1\) is kept"):
        trainer.save()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A digits CNN trained for 3 epochs (about 98 % test top-1), so that QAT starts from a good model."""
    torch.set_num_threads(1)
    return str(ensure_trained("digits_cnn", "digits", tmp_path_factory.mktemp("weights"), False, epochs=3))


@pytest.mark.fault(input="qat --lr 10 (a finite loss that diverges)", exit_code=0, kept="the run, with a warning",
                   message="warning: the training loss is diverging: its moving average rose to X, from Y at best, "
                           "and is above chance level (ln 10 = 2.3) ...: lower --lr")
def test_an_absurd_learning_rate_warns_that_training_diverges(tmp_path: Path, trained_digits: str) -> None:
    cfg = config(tmp_path / "bad", lr=10.0, weights=trained_digits, log_every=1)
    with pytest.warns(DivergenceWarning) as caught:
        out = train_outcome(cfg)
    messages = [str(w.message) for w in caught]
    assert any("training loss is diverging" in m and "lower --lr" in m for m in messages), messages
    assert any("test top-1 collapsed" in m for m in messages), messages
    assert out.warnings and len(out.warnings) == len(messages)  # each reported once, and logged
    logged = [json.loads(line) for line in (tmp_path / "bad" / "log.jsonl").read_text().splitlines()]
    assert [r["message"] for r in logged if r["event"] == "warning"] == out.warnings
    with warnings.catch_warnings():  # a sane learning rate trains without a word
        warnings.simplefilter("error", DivergenceWarning)
        assert not train_outcome(config(tmp_path / "good", lr=0.002, weights=trained_digits, log_every=1)).warnings


@pytest.mark.fault(input="qat --lr 10 --on-divergence stop", exit_code=2, kept="the last good checkpoint, if any",
                   message="the training loss is diverging ... Training stopped; no checkpoint was written (it "
                           "diverged in the first epoch)")
def test_on_divergence_stop_ends_a_diverging_run_as_a_nan_loss_does(tmp_path: Path, trained_digits: str) -> None:
    cfg = config(tmp_path, lr=10.0, weights=trained_digits, log_every=1, on_divergence="stop")
    with pytest.warns(DivergenceWarning, match="test top-1 collapsed"), \
            pytest.raises(DivergenceError, match=r"loss is diverging.*Training stopped; no checkpoint was written"):
        train_outcome(cfg)  # the accuracy collapse (a main-process finding) warns; the loss stops every process
    assert not (tmp_path / "checkpoint.pt").exists()
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


def spawn_two(worker: Callable[..., None], *args: Any, timeout: float = 150) -> None:
    """``worker(rank, 2, port, *args)`` in two spawned processes (one torch thread each); fails the test when
    they do not finish within ``timeout`` seconds (a deadlock)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = mp.start_processes(worker, args=(2, _free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.terminate()
            pytest.fail(f"the 2-process DDP run did not finish in {timeout:g} s (deadlock?)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path: Path) -> None:
    # BN folded once (strategy 0): no batch statistics, which differ per process without SyncBatchNorm
    cfg = config(tmp_path / "ddp", algorithm="lsq", bn_fold=0, epochs=1, bn_freeze_step=None)
    single = train(cfg.model_copy(update={"out_dir": str(tmp_path / "one")}))
    out = tmp_path / "ddp.pt"
    spawn_two(_ddp_worker, str(out), cfg.model_dump_json())
    ddp = torch.load(out, weights_only=True)
    for k, v in single.items():
        if v.is_floating_point():
            torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)
