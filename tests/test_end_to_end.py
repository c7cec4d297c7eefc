"""End to end: a run killed with SIGKILL and resumed ends with the same summary as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

SMALL = [
    "--set", "trainer.progress=false", "--set", "trainer.eval_samples=256", "--set", "trainer.eval_every=10",
    "--set", "trainer.checkpoint_every=3", "--set", "trainer.floor=false", "--set", "trainer.plots=false",
    "--set", "trainer.tensorboard=false", "--set", "task.num_inference_steps=20", "--set", "method.batch_size=16",
]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sqdf.cli", *args]


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _without_time(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_seconds"}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = "24"
    full = tmp_path / "full"
    subprocess.run(_cli("train", "gmm1", "--steps", steps, "--out", str(full), *SMALL), check=True, env=_env(),
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", "gmm1", "--steps", steps, "--out", str(killed), *SMALL), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        names = [n for n in os.listdir(ckpts)] if ckpts.exists() else []
        done = [int(n[5:12]) for n in names if n.startswith("ckpt_") and n.endswith(".pt")]
        if done and max(done) >= 9:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    for name in os.listdir(ckpts):
        if name.endswith(".pt"):  # every finished checkpoint is whole
            state = torch.load(ckpts / name, weights_only=True)
            assert state["iteration"] == int(name[5:12])

    res = subprocess.run(_cli("resume", str(killed)), env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert _without_time(a) == _without_time(b)
    rows_a = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [_without_time(r) for r in rows_a] == [_without_time(r) for r in rows_b]


def test_default_cli_run_writes_the_documented_files(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(_cli("train", "gaussian", "--steps", "4", "--out", str(out), *SMALL[:-6],
                              "--set", "task.num_inference_steps=20", "--set", "method.batch_size=16",
                              "--set", "trainer.plots=true", "--set", "trainer.floor=true"),
                         env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("task", "method", "seed", "reward_mean", "path_kl", "objective", "optimum", "regret",
                "reward_queries", "wall_seconds", "floor"):
        assert key in summary, key
    assert summary["optimum"] == 0.625
    assert abs(summary["objective"] - (summary["reward_mean"] - summary["alpha"] * summary["path_kl"])) < 1e-9
    # SQDF spends batch_size rollout queries and train_batch_size (= batch_size) loss queries per iteration
    assert summary["reward_queries"] == 4 * (16 + 16)
    assert (out / "plots" / "curves.png").exists()
    assert (out / "plots" / "samples_000004.png").exists()
    assert (out / "config.yaml").exists()
