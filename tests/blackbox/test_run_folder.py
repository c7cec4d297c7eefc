"""A black-box run folder: blackbox.yaml and blackbox.jsonl round-trip, and a clear error for a folder of another kind."""

from __future__ import annotations

import json

import pytest

from sqdf.blackbox.run_folder import BlackboxConfig, read_saved, write_rows, write_saved
from sqdf.errors import CheckpointError, ConfigError


def test_saved_config_and_rows_round_trip(tmp_path):
    bb = BlackboxConfig(budget=64, round_shares="1,3", noise_std=0.0)
    write_saved(str(tmp_path), "gmm1", "sqdf", bb, best_of=4)
    saved = read_saved(str(tmp_path))
    assert saved["task_name"] == "gmm1" and saved["best_of"] == 4 and BlackboxConfig(**saved["blackbox"]) == bb
    rows = [{"round": 1, "queries": 16}, {"round": 2, "queries": 64}]
    write_rows(str(tmp_path), rows)
    lines = (tmp_path / "blackbox.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert bb.round_sizes() == [16, 48]


def test_a_folder_without_blackbox_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no blackbox.yaml"):
        read_saved(str(tmp_path))
    with pytest.raises(ConfigError, match="round_shares='1,x'"):
        BlackboxConfig(round_shares="1,x").round_sizes()
