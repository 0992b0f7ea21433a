"""Save on 1, 2 and 4 real gloo ranks; load on 1, 2, 3 and 4 ranks into other layouts."""

from __future__ import annotations

import pytest

import checkpoint
from checkpoint.testing.ranks import run_ranks
from tests.dist_states import build_state, check_state

pytestmark = pytest.mark.multiproc

# save world size -> layouts saved (each into its own checkpoint)
SAVES = {1: ["plain"], 2: ["row"], 4: ["grid", "col"]}
# load world size -> target layouts
LOADS = {1: ["plain"], 2: ["row", "col"], 3: ["row", "col"], 4: ["grid", "row"]}


def _save(rank: int, world_size: int, root: str) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    for layout in SAVES[world_size]:
        ckpt.save(build_state(layout, world_size), f"{root}/ws{world_size}-{layout}")
    ckpt.close()


def _load(rank: int, world_size: int, root: str, sources: list[str]) -> int:
    ckpt = checkpoint.make_sync_checkpointer()
    checked = 0
    for source in sources:
        for layout in LOADS[world_size]:
            target = build_state(layout, world_size, zeros=True)
            loaded = ckpt.load(f"{root}/{source}", state_dict=target, strict=True)
            assert loaded is target
            check_state(loaded)
            checked += 1
    ckpt.close()
    return checked


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    root = str(tmp_path_factory.mktemp("resharding"))
    for ws in SAVES:
        run_ranks(_save, ws, root)
    return root, [f"ws{ws}-{layout}" for ws, layouts in SAVES.items() for layout in layouts]


@pytest.mark.parametrize("load_world_size", sorted(LOADS))
def test_reshard_every_saved_layout(saved: tuple[str, list[str]], load_world_size: int) -> None:
    root, sources = saved
    checked = run_ranks(_load, load_world_size, root, sources)
    assert checked == [len(sources) * len(LOADS[load_world_size])] * load_world_size


def test_load_without_target_is_whole_and_unsharded(saved: tuple[str, list[str]]) -> None:
    root, sources = saved
    ckpt = checkpoint.make_sync_checkpointer()
    for source in sources:
        full = ckpt.load(f"{root}/{source}")
        check_state(full)
        assert full["cfg"]["betas"] == (0.9, 0.95)
