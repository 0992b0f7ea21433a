"""Lightning as users install it: both packages, `ModelParallelStrategy`'s defaults on one node.

With the defaults (`data_parallel_size` = nodes = 1) each rank's `data_parallel` sub-mesh is
itself, so every rank holds a whole copy of each parameter: sub-mesh replicas. Two processes
train and save; three resume from the step-4 checkpoint exactly (parameters and AdamW state) and
train on. Each rank runs a real `Trainer`; nothing of Lightning is mocked.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from tests.frameworks import framework

framework("lightning", extra="lightning")
framework("pytorch_lightning", extra="lightning")

from checkpoint.testing.ranks import run_ranks  # noqa: E402
from tests.fsdp_workers import assert_same  # noqa: E402
from tests.lightning_workers import INTEGRATION, fit_defaults  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_model_parallel_defaults_train_on_2_and_resume_on_3_exactly(tmp_path, package):
    root = str(tmp_path / "ckpts")
    first = run_ranks(fit_defaults, 2, package, root, None, 4, timeout_secs=300)[0]
    assert sorted(os.listdir(root)) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    step4 = os.path.join(root, "epoch=0-step=4.ckpt")
    resumed = run_ranks(fit_defaults, 3, package, str(tmp_path / "more"), step4, 6, timeout_secs=300)[0]
    assert resumed["start"]["step"] == 4
    assert_same(first["end"]["model"], resumed["start"]["model"])
    assert_same(first["end"]["optim"], resumed["start"]["optim"])
    assert resumed["end"]["step"] == 6
    assert not torch.equal(resumed["end"]["model"]["net.0.weight"], first["end"]["model"]["net.0.weight"])


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_each_package_s_trainer_takes_its_own_module_s_classes(package):
    pl = importlib.import_module(package)
    integration = importlib.import_module(INTEGRATION[package])
    io = integration.ShardsafeCheckpointIO()
    trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[io], logger=False, enable_progress_bar=False)
    assert trainer.strategy.checkpoint_io is io
    strategy = integration.ShardsafeModelParallelStrategy()
    assert isinstance(strategy, importlib.import_module(f"{package}.strategies").ModelParallelStrategy)
    other = INTEGRATION["pytorch_lightning" if package == "lightning.pytorch" else "lightning.pytorch"]
    fabric = "lightning.fabric" if package == "lightning.pytorch" else "lightning_fabric"
    refused = importlib.import_module(f"{fabric}.utilities.exceptions").MisconfigurationException
    with pytest.raises(
        refused, match="Found invalid type for plugin"
    ):  # the other package's, as Lightning does
        pl.Trainer(
            accelerator="cpu", devices=1, plugins=[importlib.import_module(other).ShardsafeCheckpointIO()]
        )
