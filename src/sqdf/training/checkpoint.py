"""Atomic checkpoint files: a finished checkpoint is never overwritten by a partial one.

Files are ``DIR/checkpoints/ckpt_{iteration:07d}.pt``, written to a temporary name in the same folder,
flushed to disk and renamed into place (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import CheckpointError

PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(iteration, path) of finished checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = PATTERN.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def save_checkpoint(run_dir: str, iteration: int, state: dict, keep: int = 2) -> str:
    """Write state atomically; then delete all but the newest ``keep`` checkpoints. Returns the path."""
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"ckpt_{iteration:07d}.pt")
    tmp = os.path.join(folder, f".ckpt_{iteration:07d}.pt.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)
    for name in os.listdir(folder):  # temp files left by a run killed mid-write
        if name.startswith(".ckpt_") and ".pt.tmp" in name and name != os.path.basename(tmp):
            os.remove(os.path.join(folder, name))
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            os.remove(old)
    return path


def load_latest_checkpoint(run_dir: str, map_location="cpu") -> tuple[int, dict, str]:
    """(iteration, state, path) of the newest checkpoint; a clear CheckpointError if none or if it is corrupt."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"no checkpoint in {checkpoint_dir(run_dir)!r}: nothing to resume; start a run with "
            "`sqdf train TASK --out DIR` (checkpoints are written every trainer.checkpoint_every iterations)"
        )
    iteration, path = found[-1]
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or "iteration" not in state:
            raise ValueError("missing keys")
    except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged file
        older = [p for _, p in found[:-1]]
        fix = (f"delete it to resume from the older {os.path.basename(older[-1])}" if older
               else "delete the run directory and start again")
        raise CheckpointError(f"checkpoint {path!r} is corrupted ({type(exc).__name__}); {fix}") from exc
    return iteration, state, path


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, flushed and renamed into place, so a
    reader sees the old file or the whole new one, never a partial write."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
