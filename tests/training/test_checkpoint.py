"""Atomic checkpoints: never a partial file under a final name, newest K kept, clear errors when unreadable."""

from __future__ import annotations

import os

import pytest
import sqdf.training.checkpoint as ckpt
import torch

from sqdf.errors import CheckpointError, SqdfError
from sqdf.training.checkpoint import checkpoint_dir, list_checkpoints, load_latest_checkpoint, save_checkpoint


def _state(i: int) -> dict:
    return {"iteration": i, "weights": torch.full((3, 4), float(i)), "rng": torch.get_rng_state(), "py": [i, i + 1]}


def _iterations(run_dir) -> list[int]:
    return [i for i, _ in list_checkpoints(str(run_dir))]


def test_save_then_load_round_trip(tmp_path):
    path = save_checkpoint(str(tmp_path), 7, _state(7))
    assert path == os.path.join(str(tmp_path), "checkpoints", "ckpt_0000007.pt")
    assert os.path.isfile(path)
    iteration, state, found = load_latest_checkpoint(str(tmp_path))
    assert iteration == 7 and found == path
    assert torch.equal(state["weights"], torch.full((3, 4), 7.0))
    assert state["py"] == [7, 8]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keeps_the_newest_k(tmp_path, keep):
    for i in (2, 4, 6, 8, 10):
        save_checkpoint(str(tmp_path), i, _state(i), keep=keep)
        files = sorted(os.listdir(checkpoint_dir(str(tmp_path))))
        assert len(files) <= keep  # no stray files either
    assert _iterations(tmp_path) == [2, 4, 6, 8, 10][-keep:]
    assert load_latest_checkpoint(str(tmp_path))[0] == 10


def test_newest_is_by_iteration_number_not_name(tmp_path):
    # 10_000_000 has one digit more than the 7-digit padding; it must still count as newest
    save_checkpoint(str(tmp_path), 9_999_999, _state(1), keep=5)
    save_checkpoint(str(tmp_path), 10_000_000, _state(2), keep=5)
    save_checkpoint(str(tmp_path), 3, _state(3), keep=5)
    assert _iterations(tmp_path) == [3, 9_999_999, 10_000_000]
    assert load_latest_checkpoint(str(tmp_path))[0] == 10_000_000


def test_no_file_under_the_final_name_while_writing(tmp_path, monkeypatch):
    real_save = torch.save
    seen = {}

    def spying_save(obj, f, *args, **kwargs):
        final = os.path.join(checkpoint_dir(str(tmp_path)), "ckpt_0000005.pt")
        seen["final_exists_during_write"] = os.path.exists(final)
        seen["listed_during_write"] = _iterations(tmp_path)
        real_save(obj, f, *args, **kwargs)
        seen["listed_after_write"] = _iterations(tmp_path)

    monkeypatch.setattr(ckpt.torch, "save", spying_save)
    save_checkpoint(str(tmp_path), 5, _state(5))
    assert seen["final_exists_during_write"] is False
    assert seen["listed_during_write"] == []
    assert seen["listed_after_write"] == []  # the finished temp file is not a checkpoint until it is renamed
    assert _iterations(tmp_path) == [5]


def _crashing_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the write dies
    f.flush()
    raise OSError("No space left on device")


def test_a_write_that_dies_leaves_older_checkpoints_intact(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path), 2, _state(2))
    save_checkpoint(str(tmp_path), 4, _state(4))
    monkeypatch.setattr(ckpt.torch, "save", _crashing_save)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path), 6, _state(6))
    with pytest.raises(OSError):  # rewriting an existing iteration must not damage the finished file either
        save_checkpoint(str(tmp_path), 4, _state(400))
    monkeypatch.undo()

    folder = checkpoint_dir(str(tmp_path))
    assert not os.path.exists(os.path.join(folder, "ckpt_0000006.pt"))
    assert _iterations(tmp_path) == [2, 4]  # the partial temp files are not listed, and nothing was pruned
    assert any(name not in ("ckpt_0000002.pt", "ckpt_0000004.pt") for name in os.listdir(folder))  # temps exist
    iteration, state, path = load_latest_checkpoint(str(tmp_path))
    assert iteration == 4 and path.endswith("ckpt_0000004.pt")
    assert torch.equal(state["weights"], torch.full((3, 4), 4.0))


def test_stray_temp_files_are_ignored(tmp_path):
    save_checkpoint(str(tmp_path), 3, _state(3))
    folder = checkpoint_dir(str(tmp_path))
    for name in (".ckpt_0000009.pt.tmp12345", "ckpt_0000009.pt.tmp", "ckpt_0000009.pt~", "notes.txt"):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(b"garbage")
    assert _iterations(tmp_path) == [3]
    assert load_latest_checkpoint(str(tmp_path))[0] == 3


def test_no_checkpoint_folder(tmp_path):
    assert list_checkpoints(str(tmp_path)) == []
    with pytest.raises(CheckpointError) as err:
        load_latest_checkpoint(str(tmp_path))
    msg = str(err.value)
    assert "no checkpoint" in msg and checkpoint_dir(str(tmp_path)) in msg
    assert "sqdf train" in msg


def test_empty_checkpoint_folder(tmp_path):
    os.makedirs(checkpoint_dir(str(tmp_path)))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_latest_checkpoint(str(tmp_path))


def _truncate(path: str, keep_fraction: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "not_a_state"])
def test_corrupted_newest_names_the_file_and_the_older_one(tmp_path, damage):
    save_checkpoint(str(tmp_path), 2, _state(2))
    newest = save_checkpoint(str(tmp_path), 4, _state(4))
    if damage == "truncate":
        _truncate(newest)
    elif damage == "empty":
        _truncate(newest, 0.0)
    elif damage == "garbage":
        with open(newest, "wb") as fh:
            fh.write(os.urandom(2000))
    else:  # a readable file that is not a checkpoint state
        torch.save([1, 2, 3], newest)
    with pytest.raises(CheckpointError) as err:
        load_latest_checkpoint(str(tmp_path))
    msg = str(err.value)
    assert newest in msg and "corrupted" in msg
    assert "delete it" in msg and "ckpt_0000002.pt" in msg
    # following the advice works
    os.remove(newest)
    assert load_latest_checkpoint(str(tmp_path))[0] == 2


def test_corrupted_only_checkpoint_suggests_starting_again(tmp_path):
    only = save_checkpoint(str(tmp_path), 4, _state(4))
    _truncate(only)
    with pytest.raises(CheckpointError) as err:
        load_latest_checkpoint(str(tmp_path))
    msg = str(err.value)
    assert only in msg and "corrupted" in msg and "delete the run directory" in msg


def test_checkpoint_errors_are_sqdf_errors():
    assert issubclass(CheckpointError, SqdfError)
