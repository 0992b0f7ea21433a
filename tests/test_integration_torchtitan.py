"""torchtitan 0.3 through shardsafe: its trainer's way of building a checkpoint manager, on real gloo ranks.

torchtitan's llama3 debug model cannot run a backward pass on CPU in 0.3.0 (flex attention:
"FlexAttention does not support backward on CPU"; varlen needs CUDA's flash attention; sdpa is
refused for language models), so the optimizer steps here take gradients computed from the
parameters instead of a loss. Everything else is torchtitan's own: the model parts built from
its model registry and sharded with FSDP2, its `OptimizersContainer` (AdamW) and
`LRSchedulersContainer`, its `ModelWrapper`, and the manager built by
`config.checkpoint.build(...)` with the arguments its `Trainer` passes.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.fsdp import fully_shard

from tests.frameworks import framework

framework("torchtitan", extra="torchtitan")

from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402
from torchtitan.models.llama3 import model_registry  # noqa: E402

from checkpoint.integrations.torchtitan import ShardsafeCheckpointManager  # noqa: E402
from checkpoint.testing.ranks import run_ranks  # noqa: E402
from tests.fsdp_workers import assert_same, full  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class TrainState:
    """What torchtitan's trainer checkpoints as `train_state` (the trainer itself is that `Stateful`)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"].item())


class Loader:
    """A `Stateful` data loader position, as torchtitan's dataloaders keep one."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position, "rank_of": "any"}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _build(world_size: int, root: str, seed: int, initial_load_path: str | None = None) -> tuple:
    torch.manual_seed(seed)
    # What a Trainer.Config names as `checkpoint` (`llama3_debugmodel()` would pull in the whole trainer).
    checkpoint_config = ShardsafeCheckpointManager.Config(
        enable=True, folder="checkpoint", interval=1, keep_latest_k=2, initial_load_path=initial_load_path
    )
    model_config = model_registry("debugmodel").model
    model_config.layers = model_config.layers[:2]  # 2 of the debug model's 6 blocks: the same code, less time
    with torch.device("meta"):
        model = model_config.build()
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    optimizers = default_adamw(lr=1e-3).build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8).build(
        optimizers=optimizers, training_steps=10
    )
    train_state, loader = TrainState(), Loader()
    manager = checkpoint_config.build(  # with the arguments torchtitan's Trainer passes
        dataloader=loader,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
        base_folder=root,
    )
    return model, optimizers, lr_schedulers, train_state, loader, manager


def _snapshot(model, optimizers, lr_schedulers, train_state, loader) -> dict:
    return {
        "model": full(model.state_dict()),
        "optim": full(optimizers.state_dict()),
        "lr": lr_schedulers.state_dict(),
        "step": train_state.step,
        "position": loader.position,
    }


def _train_and_save(rank: int, world_size: int, root: str) -> dict:
    model, optimizers, lr_schedulers, train_state, loader, manager = _build(world_size, root, seed=0)
    assert manager.load() is False  # nothing saved yet, no initial load path
    for step in range(1, 5):
        for p in model.parameters():
            p.grad = torch.sin(p.detach() * step)  # no CPU backward for this model (module docstring)
        optimizers.step()
        lr_schedulers.step()
        train_state.step, loader.position = step, step * 8
        assert manager.save(step) is True
    manager.maybe_wait_for_saving()
    snapshot = _snapshot(model, optimizers, lr_schedulers, train_state, loader)  # collectives: every rank
    manager.close()
    return snapshot if rank == 0 else {}


def _resume(rank: int, world_size: int, root: str, expected: dict) -> str:
    parts = _build(world_size, root, seed=123)  # other initial values: the load must overwrite all
    manager = parts[-1]
    assert manager.load() is True
    got = _snapshot(*parts[:-1])
    for key in ("model", "optim"):
        assert_same(expected[key], got[key], key)
    assert got["lr"] == expected["lr"]
    assert (got["step"], got["position"]) == (4, 32)
    manager.close()
    # A new run (empty folder) starting from that step's model alone: initial_load_path, model only.
    fresh = _build(
        world_size,
        root + "-finetune",
        seed=7,
        initial_load_path=os.path.join(root, "checkpoint", "step-000000004"),
    )
    assert fresh[-1].load() is True
    started = _snapshot(*fresh[:-1])
    assert_same(expected["model"], started["model"], "model")
    assert (started["step"], started["position"]) == (0, 0)  # nothing but the model was loaded
    fresh[-1].close()
    return "ok"


@pytest.mark.multiproc
@pytest.mark.slow
def test_manager_saves_on_2_ranks_keeps_the_latest_2_and_loads_exactly_on_3(tmp_path):
    root = str(tmp_path / "run")
    expected = run_ranks(_train_and_save, 2, root, timeout_secs=240)[0]
    assert sorted(os.listdir(os.path.join(root, "checkpoint"))) == ["step-000000003", "step-000000004"]
    assert run_ranks(_resume, 3, root, expected, timeout_secs=240) == ["ok"] * 3


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"async_mode": "async_with_pinned_mem"}, "async_mode"),
        ({"last_save_in_hf": True}, "Hugging Face"),
        ({"export_dtype": "bfloat16"}, "export_dtype 'bfloat16'"),
    ],
)
def test_config_refuses_what_the_manager_does_not_do(fields, named):
    with pytest.raises(ValueError, match=named):
        ShardsafeCheckpointManager.Config(enable=True, **fields)
