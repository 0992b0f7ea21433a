"""torchtitan's own parallelize function producing sub-mesh replicas, saved by its manager and resharded.

`parallelize_llama` with `ParallelismConfig(data_parallel_shard_degree=2, tensor_parallel_degree=2,
spmd_backend="partial_dtensor")` on 4 gloo ranks shards the debug model with FSDP2 over each TP
coordinate's `dp_shard` sub-mesh (ranks {0, 2} and {1, 3}): every parameter is held twice, once per
sub-mesh. torchtitan cannot run a backward pass on CPU (see test_integration_torchtitan.py), so the
optimizer steps on gradients computed from the parameters. `ShardsafeCheckpointManager` saves two
steps; 3 ranks of plain FSDP2 (the existing test's layout) load the last one exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.frameworks import framework

framework("torchtitan", extra="torchtitan")

from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig  # noqa: E402
from torchtitan.distributed import ParallelDims  # noqa: E402
from torchtitan.models.llama3 import model_registry  # noqa: E402
from torchtitan.models.llama3.parallelize import parallelize_llama  # noqa: E402

from checkpoint.integrations.torchtitan import ShardsafeCheckpointManager  # noqa: E402
from checkpoint.testing.ranks import run_ranks  # noqa: E402
from tests.fsdp_workers import assert_same  # noqa: E402
from tests.test_integration_torchtitan import Loader, TrainState, _build, _snapshot  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _torchtitan_parallel(world_size: int, root: str) -> tuple:
    import torchtitan.distributed.parallel_dims as parallel_dims_module

    parallel_dims_module.device_type = "cpu"  # torchtitan picks the accelerator's type; gloo here
    parallelism = ParallelismConfig(
        data_parallel_shard_degree=2, tensor_parallel_degree=2, spmd_backend="partial_dtensor"
    )
    dims = ParallelDims.from_config(parallelism, world_size)
    dims.build_mesh()
    model_config = model_registry("debugmodel").model
    model_config.layers = model_config.layers[:2]
    with torch.device("meta"):
        model = model_config.build()
    parallelize_llama(
        model,
        parallel_dims=dims,
        training=TrainingConfig(),
        parallelism=parallelism,
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder=root,
    )
    model.to_empty(device="cpu")
    torch.manual_seed(0)  # every sub-mesh builds the same replica, as torchtitan's seeded init does
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    optimizers = default_adamw(lr=1e-3).build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8).build(
        optimizers=optimizers, training_steps=10
    )
    train_state, loader = TrainState(), Loader()
    manager = ShardsafeCheckpointManager.Config(
        enable=True, folder="checkpoint", interval=1, keep_latest_k=2
    ).build(
        dataloader=loader,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
        base_folder=root,
    )
    return model, optimizers, lr_schedulers, train_state, loader, manager


def _train_and_save(rank: int, world_size: int, root: str) -> dict:
    model, optimizers, lr_schedulers, train_state, loader, manager = _torchtitan_parallel(world_size, root)
    meshes = {tuple(p.device_mesh.mesh.flatten().tolist()) for p in model.parameters()}
    for step in range(1, 3):
        for p in model.parameters():
            p.grad = torch.sin(p.detach() * step)
        optimizers.step()
        lr_schedulers.step()
        train_state.step, loader.position = step, step * 8
        assert manager.save(step) is True
    manager.maybe_wait_for_saving()
    snapshot = _snapshot(model, optimizers, lr_schedulers, train_state, loader)
    manager.close()
    return {"snapshot": snapshot, "meshes": sorted(meshes)} if rank in (0, 1) else {}


def _resume(rank: int, world_size: int, root: str, expected: dict) -> str:
    parts = _build(world_size, root, seed=123)  # plain FSDP2 over all 3 ranks, other initial values
    manager = parts[-1]
    assert manager.load() is True
    got = _snapshot(*parts[:-1])
    for key in ("model", "optim"):
        assert_same(expected[key], got[key], key)
    assert got["lr"] == expected["lr"]
    assert (got["step"], got["position"]) == (2, 16)
    manager.close()
    return "ok"


@pytest.mark.multiproc
@pytest.mark.slow
def test_torchtitan_dp_shard_x_tp_submesh_replicas_save_on_4_and_load_on_3(tmp_path):
    root = str(tmp_path / "run")
    first = run_ranks(_train_and_save, 4, root, timeout_secs=300)
    # torchtitan put each TP coordinate's parameters on its own dp_shard sub-mesh: sub-mesh replicas.
    assert (first[0]["meshes"], first[1]["meshes"]) == ([(0, 2)], [(1, 3)])
    assert sorted(os.listdir(os.path.join(root, "checkpoint"))) == ["step-000000001", "step-000000002"]
    assert run_ranks(_resume, 3, root, first[0]["snapshot"], timeout_secs=300) == ["ok"] * 3
