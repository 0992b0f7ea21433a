"""FSDP2 and FSDP2+TP models with AdamW state: saved on real ranks, loaded on other world sizes."""

from __future__ import annotations

import pytest

from checkpoint.testing.ranks import run_ranks
from tests.fsdp_workers import load_and_compare, save_trained

pytestmark = pytest.mark.multiproc


def test_fsdp2_adamw_saved_on_2_loads_on_3_on_1_and_on_2(tmp_path):
    path = str(tmp_path / "fsdp")
    expected = run_ranks(save_trained, 2, "fsdp", path)[0]
    assert run_ranks(load_and_compare, 3, "fsdp", path, expected, 2) == ["ok"] * 3
    assert run_ranks(load_and_compare, 1, "plain", path, expected, 2) == ["ok"]
    assert run_ranks(load_and_compare, 2, "fsdp", path, expected, 2) == ["ok"] * 2


def test_fsdp2_tp_2x2_saved_on_4_loads_into_fsdp_on_2(tmp_path):
    path = str(tmp_path / "fsdp_tp")
    expected = run_ranks(save_trained, 4, "fsdp_tp", path, timeout_secs=240)[0]
    assert run_ranks(load_and_compare, 2, "fsdp", path, expected, 4) == ["ok"] * 2
