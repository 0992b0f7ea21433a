"""PyTorch Lightning 2.6 through shardsafe, on real gloo ranks: FSDP2 saves on 2 processes, resumes on 3.

Each rank runs a real `Trainer` (Lightning finds the ranks the launcher started through the
torchrun variables it sets and joins its process group); nothing of Lightning is mocked.
"""

from __future__ import annotations

import os
import pathlib
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from tests.frameworks import framework

pl = framework("pytorch_lightning", extra="lightning")

import checkpoint  # noqa: E402
from checkpoint.integrations.pytorch_lightning import (  # noqa: E402
    ShardsafeCheckpointIO,
    ShardsafeModelParallelStrategy,
)
from checkpoint.testing.ranks import run_ranks  # noqa: E402
from planners.errors import PickleNotAllowedError  # noqa: E402
from tests.fsdp_workers import assert_same, full  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class Regression(pl.LightningModule):
    def __init__(self, fsdp: bool) -> None:
        super().__init__()
        self.save_hyperparameters()  # an AttributeDict in the checkpoint: saved as a plain dict, no pickle
        self.fsdp = fsdp
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 30), nn.ReLU(), nn.Linear(30, 6))  # 30 rows: uneven over 3

    def configure_model(self) -> None:
        if self.fsdp:
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        return DataLoader(
            TensorDataset(torch.randn(96, 8, generator=g), torch.randn(96, 6, generator=g)), batch_size=4
        )


class Snapshot(pl.Callback):
    """The full model and AdamW state and the global step, when training starts (after a restore) and ends."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def _take(self, trainer: pl.Trainer, module: Regression, when: str) -> None:
        optim = trainer.optimizers[0]
        state = {
            "model": full(get_model_state_dict(module)),
            "optim": full(get_optimizer_state_dict(module, optim)["state"]),
            "step": trainer.global_step,
        }
        self.seen[when] = state

    def on_train_start(self, trainer: pl.Trainer, module: Regression) -> None:
        self._take(trainer, module, "start")

    def on_train_end(self, trainer: pl.Trainer, module: Regression) -> None:
        self._take(trainer, module, "end")


def _trainer(
    world_size: int, strategy: object, root: str, max_steps: int, snapshot: Snapshot, **kw: object
) -> pl.Trainer:
    saves = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    return pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[saves, snapshot],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )


def _fit_fsdp(
    rank: int, world_size: int, root: str, asynchronous: bool, resume: str | None, max_steps: int
) -> dict:
    strategy = ShardsafeModelParallelStrategy(
        data_parallel_size=world_size, tensor_parallel_size=1, asynchronous=asynchronous
    )
    snapshot = Snapshot()
    trainer = _trainer(world_size, strategy, root, max_steps, snapshot)
    trainer.fit(Regression(fsdp=True), ckpt_path=resume)
    return snapshot.seen if rank == 0 else {}


def _expect_checkpoint(path: str, seen: dict) -> None:
    """The committed checkpoint holds exactly the final state the training reached (Lightning's keys)."""
    saved = checkpoint.make_sync_checkpointer().load(path)
    assert_same(seen["model"], saved["state_dict"])
    assert_same(seen["optim"], saved["optimizer_0"]["state"])
    assert saved["lightning"]["global_step"] == seen["step"]
    assert saved["lightning"]["hyper_parameters"] == {"fsdp": True}
    assert saved["optimizer_0"]["param_groups"][0]["lr"] == 1e-2


@pytest.mark.multiproc
@pytest.mark.slow
def test_fsdp2_trains_on_2_processes_and_resumes_on_3_at_the_saved_step(tmp_path):
    root = str(tmp_path / "ckpts")
    first = run_ranks(_fit_fsdp, 2, root, False, None, 4, timeout_secs=240)[0]
    assert sorted(os.listdir(root)) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    step4 = os.path.join(root, "epoch=0-step=4.ckpt")
    _expect_checkpoint(step4, first["end"])
    resumed = run_ranks(_fit_fsdp, 3, str(tmp_path / "more"), False, step4, 6, timeout_secs=240)[0]
    assert resumed["start"]["step"] == 4
    assert_same(first["end"]["model"], resumed["start"]["model"])
    assert_same(first["end"]["optim"], resumed["start"]["optim"])
    assert resumed["end"]["step"] == 6
    assert not torch.equal(resumed["end"]["model"]["net.0.weight"], first["end"]["model"]["net.0.weight"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_asynchronous_saves_commit_every_checkpoint_modelcheckpoint_asks_for(tmp_path):
    root = str(tmp_path / "ckpts")
    seen = run_ranks(_fit_fsdp, 2, root, True, None, 4, timeout_secs=240)[0]
    assert sorted(os.listdir(root)) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    _expect_checkpoint(os.path.join(root, "epoch=0-step=4.ckpt"), seen["end"])
    assert checkpoint.verify(os.path.join(root, "epoch=0-step=2.ckpt")).ok


def _fit_ddp(rank: int, world_size: int, root: str, resume: str | None, max_steps: int) -> dict:
    snapshot = Snapshot()
    trainer = _trainer(world_size, "ddp", root, max_steps, snapshot, plugins=[ShardsafeCheckpointIO()])
    trainer.fit(Regression(fsdp=False), ckpt_path=resume)
    return snapshot.seen if rank == 0 else {}


@pytest.mark.multiproc
@pytest.mark.slow
def test_checkpoint_io_round_trips_a_ddp_run(tmp_path):
    root = str(tmp_path / "ckpts")
    first = run_ranks(_fit_ddp, 2, root, None, 4, timeout_secs=240)[0]
    step4 = os.path.join(root, "epoch=0-step=4.ckpt")
    saved = checkpoint.make_sync_checkpointer().load(step4)
    assert_same(first["end"]["model"], saved["state_dict"])
    assert saved["global_step"] == 4
    resumed = run_ranks(_fit_ddp, 2, str(tmp_path / "more"), step4, 6, timeout_secs=240)[0]
    assert resumed["start"]["step"] == 4
    assert_same(first["end"]["model"], resumed["start"]["model"])
    assert_same(first["end"]["optim"], resumed["start"]["optim"])
    assert resumed["end"]["step"] == 6


def test_checkpoint_io_refuses_pickle_unless_allowed_and_round_trips_what_json_holds(tmp_path):
    path = str(tmp_path / "epoch=0-step=1.ckpt")
    state = {
        "state_dict": OrderedDict(w=torch.arange(4.0)),
        "global_step": 1,
        "hyper_parameters": {"lr": 0.1},
    }
    io = ShardsafeCheckpointIO()
    io.save_checkpoint(state, path)
    loaded = io.load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
    assert (loaded["global_step"], loaded["hyper_parameters"]) == (1, {"lr": 0.1})
    with pytest.raises(PickleNotAllowedError, match="'hyper_parameters'"):
        io.save_checkpoint({**state, "hyper_parameters": {"root": pathlib.Path("/data")}}, path)
    trusting = ShardsafeCheckpointIO(allow_pickle=True)
    trusting.save_checkpoint({**state, "hyper_parameters": {"root": pathlib.Path("/data")}}, path)
    with pytest.raises(PickleNotAllowedError):
        io.load_checkpoint(path)
    assert trusting.load_checkpoint(path)["hyper_parameters"] == {"root": pathlib.Path("/data")}
    trusting.remove_checkpoint(path)
    assert not os.path.exists(path)
    io.teardown()
    trusting.teardown()


def test_the_strategy_refuses_a_consolidated_checkpoint_it_would_not_write():
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False"):
        ShardsafeModelParallelStrategy(save_distributed_checkpoint=False)
