"""The Trainer end to end: what a run directory holds, honest query counts, and exact resume (also after SIGKILL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from sqdf.cli import main
from sqdf.training.checkpoint import list_checkpoints

# CPU everywhere: exact (bit-for-bit) resume is promised on CPU; a CUDA box would otherwise pick the GPU
QUIET = ["--set", "trainer.progress=false", "--set", "trainer.device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


def _without_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "wall_seconds"}


def _config(run_dir) -> dict:
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        return yaml.safe_load(fh)


# ---- a short run -----------------------------------------------------------------------------------------------

STEPS, BATCH, TRAIN_BATCH, REPLAY = 6, 16, 8, 2


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer") / "run"
    code = main(["train", "gaussian", "--steps", str(STEPS), "--seed", "5", "--out", str(out), *QUIET,
                 "--set", "trainer.eval_samples=256", "--set", "task.num_inference_steps=20",
                 "--set", f"method.batch_size={BATCH}", "--set", f"method.train_batch_size={TRAIN_BATCH}",
                 "--set", f"method.replay_ratio={REPLAY}", "--set", "trainer.checkpoint_every=2",
                 "--set", "trainer.eval_every=3", "--set", "trainer.tensorboard=true"])
    assert code == 0
    return out


def test_short_run_writes_the_documented_files(short_run):
    names = set(os.listdir(short_run))
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "plots", "tb"} <= names
    assert not [n for n in names if ".tmp" in n]  # atomic writes leave no temp files behind
    # checkpoints every 2 iterations, the newest 2 (trainer.keep_checkpoints) kept
    assert sorted(os.listdir(short_run / "checkpoints")) == ["ckpt_0000004.pt", "ckpt_0000006.pt"]
    state = torch.load(short_run / "checkpoints" / "ckpt_0000006.pt", weights_only=True)
    assert state["iteration"] == STEPS
    # sample plots at each evaluation (0, 3, 6) and the curves
    plots = sorted(os.listdir(short_run / "plots"))
    assert plots == ["curves.png", "samples_000000_base.png", "samples_000003.png", "samples_000006.png"]
    for name in plots:
        with open(short_run / "plots" / name, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(short_run / "tb"))
    saved = _config(short_run)
    assert saved["task_name"] == "gaussian" and saved["method_name"] == "sqdf"
    assert saved["config"]["method"]["replay_ratio"] == REPLAY and saved["config"]["trainer"]["seed"] == 5


def test_summary_keys_and_values(short_run):
    s = _summary(short_run)
    for key in ("task", "method", "seed", "reward_mean", "path_kl", "objective", "optimum", "regret",
                "reward_queries", "wall_seconds"):
        assert key in s, key
    assert (s["task"], s["method"], s["seed"], s["iterations"]) == ("gaussian", "sqdf", 5, STEPS)
    assert s["optimum"] == 0.625
    assert s["objective"] == pytest.approx(s["reward_mean"] - s["alpha"] * s["path_kl"], abs=1e-12)
    assert s["regret"] == pytest.approx(s["optimum"] - s["objective"], abs=1e-12)
    assert s["path_kl"] > 0 and s["wall_seconds"] > 0
    # the summary's metrics are those of the final evaluation
    final_eval = [r for r in _rows(short_run) if r["kind"] == "eval"][-1]
    assert final_eval["iteration"] == STEPS
    for key in ("reward_mean", "path_kl", "objective", "regret"):
        assert s[key] == final_eval[key]


def test_reward_queries_count_every_reward_evaluation(short_run):
    # the default SQDF (a learned soft value) scores its batch_size rollouts and nothing else; evaluations (and the
    # exact-score floor) are free. sqdf-paper's pair rewards are counted in test_reward_queries_match_...
    per_iteration = BATCH
    assert _summary(short_run)["reward_queries"] == STEPS * per_iteration
    rows = _rows(short_run)
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, STEPS + 1))
    assert [r["reward_queries"] for r in train] == [i * per_iteration for i in range(1, STEPS + 1)]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["iteration"], r["reward_queries"]) for r in evals] == [(0, 0), (3, 3 * per_iteration),
                                                                      (6, 6 * per_iteration)]


@pytest.mark.parametrize("method, per_iteration", [("sqdf-paper", 8 + 4 * 3), ("sqdf", 8)])
def test_reward_queries_match_an_independent_count(tmp_path, monkeypatch, method, per_iteration):
    """Count the samples the task's reward actually sees during training, not what the trainer says it spent."""
    import sqdf.tasks
    from sqdf.tasks.builtin import gaussian

    seen = {"training": 0}

    def counting_factory(config):
        task = gaussian(config)
        inner = task._reward

        def reward(x, cond=None):
            if seen.get("on"):
                seen["training"] += x.shape[0]
            return inner(x, cond)

        task._reward = reward
        return task

    import sqdf.training.trainer as trainer_mod

    real_evaluate = trainer_mod.Trainer.evaluate

    def evaluate(self, n=None):  # evaluation queries are not counted: switch the tally off around them
        seen["on"] = False
        try:
            return real_evaluate(self, n)
        finally:
            seen["on"] = True

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
    monkeypatch.setitem(sqdf.tasks.TASKS, "counted", counting_factory)
    out = tmp_path / "run"
    code = main(["train", "counted", "--method", method, "--steps", "3", "--out", str(out), *QUIET,
                 "--set", "trainer.eval_samples=64", "--set", "task.num_inference_steps=10",
                 "--set", "method.batch_size=8", "--set", "method.train_batch_size=4", "--set", "method.replay_ratio=3",
                 "--set", "trainer.floor=false", "--set", "trainer.plots=false", "--set", "trainer.tensorboard=false"])
    assert code == 0
    assert seen["training"] == 3 * per_iteration
    assert _summary(out)["reward_queries"] == seen["training"]


# ---- exact resume, in-process ----------------------------------------------------------------------------------

RESUME_SET = [
    *QUIET, "--seed", "3", "--set", "trainer.eval_samples=256", "--set", "task.num_inference_steps=20",
    "--set", "method.batch_size=16", "--set", "trainer.checkpoint_every=2", "--set", "trainer.eval_every=4",
    "--set", "trainer.plots=false", "--set", "trainer.tensorboard=false",
]


def test_resume_in_process_equals_uninterrupted(tmp_path):
    # eval_every=4 so that the final evaluation of the 4-iteration leg is also one of the uninterrupted run's
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "gmm1", "--steps", "8", "--out", str(full), *RESUME_SET]) == 0
    assert main(["train", "gmm1", "--steps", "4", "--out", str(part), *RESUME_SET]) == 0
    assert _summary(part)["iterations"] == 4
    assert main(["resume", str(part), "--steps", "8"]) == 0

    a, b = _summary(full), _summary(part)
    assert b["iterations"] == 8
    assert set(a) == set(b)
    assert _without_time(a) == _without_time(b)
    rows_a, rows_b = _rows(full), _rows(part)
    assert len(rows_a) == len(rows_b) == 8 + 3  # 8 train rows, evaluations at 0, 4, 8
    assert [_without_time(r) for r in rows_a] == [_without_time(r) for r in rows_b]
    assert _config(full) == _config(part)  # --steps 8 was written back
    # the final checkpoints hold the same weights
    sa = torch.load(full / "checkpoints" / "ckpt_0000008.pt", weights_only=True)
    sb = torch.load(part / "checkpoints" / "ckpt_0000008.pt", weights_only=True)
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "gaussian", "--steps", "2", "--out", str(out), *RESUME_SET]) == 0
    before, rows = _summary(out), _rows(out)
    assert main(["resume", str(out)]) == 0
    assert _without_time(_summary(out)) == _without_time(before)
    assert _rows(out) == rows


# ---- THE KEY TEST: SIGKILL, then resume in a new process -------------------------------------------------------

KILL_STEPS = 40
KILL_SET = [
    "--steps", str(KILL_STEPS), "--seed", "11", *QUIET, "--set", "trainer.checkpoint_every=5",
    "--set", "trainer.eval_every=20", "--set", "trainer.eval_samples=512", "--set", "task.num_inference_steps=20",
    "--set", "method.batch_size=32", "--set", "trainer.plots=false", "--set", "trainer.tensorboard=false",
]
CKPT = re.compile(r"^ckpt_(\d+)\.pt$")


def _env() -> dict:
    # the same thread count in every process (CPU kernels are deterministic at a fixed thread count)
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sqdf.cli", *args]


def _last_logged_iteration(run_dir) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            lines = fh.read().split("\n")[:-1]  # complete lines only
    except FileNotFoundError:
        return -1
    return json.loads(lines[-1])["iteration"] if lines else -1


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run goes alongside the one to be killed
    full_proc = subprocess.Popen(_cli("train", "gmm1", "--out", str(full), *KILL_SET), env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_cli("train", "gmm1", "--out", str(killed), *KILL_SET), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        folder = killed / "checkpoints"
        deadline = time.time() + 90
        newest = -1
        while time.time() < deadline and proc.poll() is None:
            if folder.is_dir():
                done = [int(m.group(1)) for m in map(CKPT.match, os.listdir(folder)) if m]
                newest = max(done, default=-1)
                # kill between checkpoints, once iterations past the newest one are logged (resume drops them)
                if newest >= 10 and _last_logged_iteration(killed) > newest:
                    break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed; give it more --steps"
        assert newest >= 10
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, full_err = full_proc.communicate(timeout=120)
    assert full_proc.returncode == 0, full_err

    # the kill left no partial checkpoint under a final name, and no summary
    assert not (killed / "summary.json").exists()
    names = os.listdir(folder)
    finished = sorted(n for n in names if CKPT.match(n))
    assert finished and int(CKPT.match(finished[-1]).group(1)) < KILL_STEPS
    for name in finished:
        state = torch.load(folder / name, weights_only=True)
        assert state["iteration"] == int(CKPT.match(name).group(1))
    for name in set(names) - set(finished):  # only an interrupted write's temp file may remain, unlisted
        assert name.startswith(".ckpt_") and ".tmp" in name, name
    assert [p for _, p in list_checkpoints(str(killed))] == [str(folder / n) for n in finished]

    res = subprocess.run(_cli("resume", str(killed)), env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    a, b = _summary(full), _summary(killed)
    assert a["iterations"] == b["iterations"] == KILL_STEPS
    assert set(a) == set(b)
    assert _without_time(a) == _without_time(b)  # exact: floats included
    rows_a, rows_b = _rows(full), _rows(killed)
    assert [_without_time(r) for r in rows_a] == [_without_time(r) for r in rows_b]
    assert [r["iteration"] for r in rows_b if r["kind"] == "train"] == list(range(1, KILL_STEPS + 1))


def test_query_budget_stops_the_run_and_paces_evaluations(tmp_path):
    out = tmp_path / "budget"
    code = main(["train", "gaussian", "--method", "sqdf-paper", "--steps", "1000", "--out", str(out), *QUIET,
                 "--set", "trainer.eval_samples=128", "--set", "task.num_inference_steps=10",
                 "--set", "method.batch_size=16", "--set", "method.train_batch_size=16",
                 "--set", "trainer.max_queries=100", "--set", "trainer.eval_every=0",
                 "--set", "trainer.eval_every_queries=64", "--set", "trainer.floor=false"])
    assert code == 0
    summary = _summary(out)
    # 32 queries per iteration (16 rollouts + 16 pair rewards): the budget of 100 is spent after 4 iterations
    assert summary["iterations"] == 4 and summary["reward_queries"] == 128
    evals = [r for r in _rows(out) if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [0, 2, 4]  # base, then each time 64 or 128 queries are passed


def test_gradient_accumulation_sums_backward_passes_before_one_step(tmp_path):
    """Two accumulated backward passes then one optimizer step == one step on the mean of the two losses."""
    from sqdf.training.run_setup import default_config
    from sqdf.training.trainer import Trainer

    def build(accumulate: int, name: str) -> Trainer:
        cfg = default_config("alignprop", "gaussian")
        cfg.update({"trainer": {"device": "cpu", "progress": False, "tensorboard": False, "plots": False,
                                "gradient_accumulation_steps": accumulate}, "method": {"max_grad_norm": 0.0}})
        return Trainer("gaussian", "alignprop", cfg, str(tmp_path / name))

    def loss(trainer, seed):
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(seed))
        return trainer.policy.step_mean(x, 3).pow(2).mean()

    acc, one = build(2, "acc"), build(1, "one")
    params = lambda t: torch.cat([p.detach().flatten().clone() for p in t.policy.trainable_parameters()])  # noqa
    start = params(acc)
    torch.testing.assert_close(start, params(one))
    first = acc._optimizer_step(loss(acc, 1))
    assert first["grad_norm"] != first["grad_norm"]  # NaN: no step taken yet
    torch.testing.assert_close(params(acc), start, rtol=0, atol=0)
    acc._optimizer_step(loss(acc, 2))
    one._optimizer_step((loss(one, 1) + loss(one, 2)) / 2)
    assert not torch.equal(params(acc), start)
    torch.testing.assert_close(params(acc), params(one), rtol=1e-5, atol=1e-7)


def test_resume_mid_accumulation_equals_uninterrupted(tmp_path):
    """A checkpoint taken between the backward passes of one accumulated step keeps the pending gradients."""
    args = ["--set", "trainer.gradient_accumulation_steps=2", "--set", "trainer.checkpoint_every=1",
            "--set", "trainer.eval_samples=64", "--set", "task.num_inference_steps=10", "--set", "method.batch_size=8",
            *QUIET]
    assert main(["train", "gaussian", "--steps", "3", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["train", "gaussian", "--steps", "1", "--out", str(tmp_path / "b"), *args]) == 0
    assert main(["resume", str(tmp_path / "b"), "--steps", "3"]) == 0
    train = lambda d: [r for r in _rows(d) if r["kind"] == "train"]  # noqa: E731
    assert len(train(tmp_path / "a")) == 3 and train(tmp_path / "a") == train(tmp_path / "b")


def test_cosine_lr_schedule_reaches_its_final_fraction_at_the_last_step(tmp_path):
    from sqdf.training.run_setup import default_config
    from sqdf.training.trainer import Trainer

    cfg = default_config("alignprop", "gaussian")
    cfg.update({"trainer": {"steps": 5, "device": "cpu", "progress": False, "tensorboard": False, "plots": False,
                            "eval_every": 0, "eval_samples": 16, "floor": False},
                "method": {"lr": 1e-3, "lr_schedule": "cosine", "lr_final_fraction": 0.25, "batch_size": 4},
                "task": {"num_inference_steps": 5}})
    trainer = Trainer("gaussian", "alignprop", cfg, str(tmp_path / "run"))
    seen = []
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.train()
    assert seen[0] == pytest.approx(1e-3) and seen[-1] == pytest.approx(2.5e-4)
    assert seen == sorted(seen, reverse=True)
