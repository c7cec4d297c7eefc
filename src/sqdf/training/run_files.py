"""The files of a run directory that the Trainer appends to and rewrites: ``metrics.jsonl`` (one JSON row per logged
iteration or evaluation) and ``samples.safetensors`` (the final evaluation's samples). Every rewrite is atomic."""

from __future__ import annotations

import json
import os

import torch

from .checkpoint import atomic_write_text


def metrics_path(run_dir: str) -> str:
    return os.path.join(run_dir, "metrics.jsonl")


def append_row(run_dir: str, row: dict) -> None:
    """Append one row to DIR/metrics.jsonl."""
    with open(metrics_path(run_dir), "a") as fh:
        fh.write(json.dumps(row) + "\n")


def eval_rows(run_dir: str) -> list[dict]:
    """The evaluation rows of DIR/metrics.jsonl, in order."""
    with open(metrics_path(run_dir)) as fh:
        return [row for row in map(json.loads, fh) if row.get("kind") == "eval"]


def truncate_metrics(run_dir: str, iteration: int) -> None:
    """Drop rows logged after ``iteration`` (written after the checkpoint being resumed) and a line cut by a kill."""
    path = metrics_path(run_dir)
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by the kill
            if row.get("iteration", 0) > iteration:
                break
            keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(keep))


def save_samples(run_dir: str, samples: torch.Tensor) -> None:
    """DIR/samples.safetensors: key 'samples', [n, *shape] float32, written atomically."""
    from safetensors.torch import save_file

    path = os.path.join(run_dir, "samples.safetensors")
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"samples": samples.detach().to(torch.float32).cpu().contiguous()}, tmp)
    os.replace(tmp, path)
