"""PyTorch Lightning with FSDP2, checkpointed by shardsafe: train on 2 processes, resume on 3.

Needs the `lightning` extra (`pip install -e '.[lightning]'`). Run it twice with torchrun:

    torchrun --nproc-per-node 2 examples/lightning_fsdp2.py --dir /tmp/shardsafe-lightning --steps 4
    torchrun --nproc-per-node 3 examples/lightning_fsdp2.py --dir /tmp/shardsafe-lightning --steps 8 --resume

The only shardsafe line is the strategy: `ShardsafeModelParallelStrategy` in place of
Lightning's `ModelParallelStrategy`. `ModelCheckpoint` writes every 2 steps into
`--dir` (each `epoch=..-step=...ckpt` is a shardsafe checkpoint directory), and
`--resume` continues from the newest one on however many processes torchrun starts.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from checkpoint.integrations.lightning import ShardsafeModelParallelStrategy


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 30), nn.ReLU(), nn.Linear(30, 6))

    def configure_model(self) -> None:
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
        data = TensorDataset(torch.randn(96, 8, generator=g), torch.randn(96, 6, generator=g))
        return DataLoader(data, batch_size=4)


def newest(directory: str) -> str:
    """The checkpoint of the highest step in `directory`."""
    names = [n for n in os.listdir(directory) if n.endswith(".ckpt")]
    return os.path.join(
        directory, max(names, key=lambda n: int(n.rsplit("step=", 1)[1].removesuffix(".ckpt")))
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=ShardsafeModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1),
        max_steps=args.steps,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=args.dir, every_n_train_steps=2, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), ckpt_path=newest(args.dir) if args.resume else None)
    if trainer.is_global_zero:
        print(
            f"{world_size} processes reached global step {trainer.global_step}; checkpoints: {sorted(os.listdir(args.dir))}"
        )


if __name__ == "__main__":
    main()
