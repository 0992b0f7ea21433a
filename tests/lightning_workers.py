"""Rank functions of the Lightning layout tests, for either Lightning package (spawned ranks import them).

`fit_defaults` trains with `ShardsafeModelParallelStrategy()` left at Lightning's defaults on one
node, as a new user would: `data_parallel_size` is the number of nodes (1), so each rank's
`data_parallel` sub-mesh is itself and holds a whole copy of every parameter.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from tests.fsdp_workers import full

# Lightning package -> the shardsafe module that serves it.
INTEGRATION = {
    "lightning.pytorch": "checkpoint.integrations.lightning",
    "pytorch_lightning": "checkpoint.integrations.pytorch_lightning",
}


def _classes(package: str):
    pl = importlib.import_module(package)

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 30), nn.ReLU(), nn.Linear(30, 6))

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            data = TensorDataset(torch.randn(96, 8, generator=g), torch.randn(96, 6, generator=g))
            return DataLoader(data, batch_size=4)

    class Snapshot(pl.Callback):
        def __init__(self) -> None:
            self.seen: dict = {}

        def _take(self, trainer, module, when: str) -> None:
            optim = trainer.optimizers[0]
            self.seen[when] = {
                "model": full(get_model_state_dict(module)),
                "optim": full(get_optimizer_state_dict(module, optim)["state"]),
                "step": trainer.global_step,
            }

        def on_train_start(self, trainer, module) -> None:
            self._take(trainer, module, "start")

        def on_train_end(self, trainer, module) -> None:
            self._take(trainer, module, "end")

    return pl, Regression, Snapshot


def fit_defaults(
    rank: int, world_size: int, package: str, root: str, resume: str | None, max_steps: int
) -> dict:
    pl, Regression, Snapshot = _classes(package)
    integration = importlib.import_module(INTEGRATION[package])
    snapshot = Snapshot()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=integration.ShardsafeModelParallelStrategy(),
        max_steps=max_steps,
        callbacks=[
            pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1),
            snapshot,
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(Regression(), ckpt_path=resume)
    return snapshot.seen if rank == 0 else {}
