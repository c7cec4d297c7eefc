"""The command line: bad input gives exit code 2 and one line naming the value and the fix, never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sqdf.tasks
from sqdf.cli import main
from sqdf.diffusion.mixture import GaussianMixture
from sqdf.tasks import MixtureTask, TaskConfig

# A run small enough to take about a second in-process.
SMALL = [
    "--set", "trainer.progress=false", "--set", "trainer.eval_samples=64", "--set", "trainer.checkpoint_every=2",
    "--set", "trainer.tensorboard=false", "--set", "trainer.plots=false", "--set", "trainer.floor=false",
    "--set", "task.num_inference_steps=8", "--set", "method.batch_size=16", "--set", "trainer.device=cpu",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    """The single 'sqdf: error: ...' line of stderr (and nothing else there)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sqdf: error: "), err
    return lines[0]


def _digest(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    summary.pop("wall_seconds")
    return summary


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-iteration gaussian run with checkpoints at 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "gaussian", "--steps", "4", "--out", str(out), *SMALL]) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ---- sqdf tasks ------------------------------------------------------------------------------------------------


def test_tasks_lists_every_task_with_its_optimum(capsys):
    code, out, err = _cli(capsys, "tasks")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert set(rows) == set(sqdf.tasks.TASKS)
    assert rows["gmm1"].split()[2] == "-1.4397"
    assert rows["gmm2"].split()[2] == "-2.9678"
    assert rows["gaussian"].split()[2] == "0.6250"


def test_help_config_lists_keys_and_does_not_train(capsys, tmp_path):
    code, out, _ = _cli(capsys, "train", "gmm1", "--method", "sqdf-paper", "--help-config", "--out",
                        str(tmp_path / "never"))
    assert code == 0
    from sqdf.methods import SQDFPaperConfig
    from sqdf.tasks import PRESETS

    preset = PRESETS["gmm1"]["sqdf-paper"]["method"]["gamma"]
    assert preset != SQDFPaperConfig().gamma
    assert f"method.gamma = {preset}" in out  # the gmm1 preset applied to the default
    assert "trainer.steps = 300" in out and "task.eta = 1.0" in out
    assert not (tmp_path / "never").exists()


# ---- bad input: one line, exit code 2 --------------------------------------------------------------------------

BAD_INPUT = {
    # id: (argv after 'train', strings the message must contain: the bad value, and the fix)
    "unknown task": (["gmx1"], ["'gmx1'", "did you mean 'gmm1'", "sqdf tasks"]),
    "unknown method": (["gmm1", "--method", "sqd"], ["'sqd'", "did you mean 'sqdf'", "Known methods: sqdf"]),
    "mistyped key": (["gmm1", "--set", "method.gamm=0.9"], ["'method.gamm'", "did you mean method.gamma"]),
    "not key=value": (["gmm1", "--set", "method.gamma"], ["'method.gamma'", "key=value"]),
    "wrong type": (["gmm1", "--set", "trainer.steps=ten"], ["trainer.steps='ten'", "int"]),
    "task alpha 0": (["gmm1", "--set", "task.alpha=0"], ["alpha=0.0", "positive", "try 1.0"]),
    "task alpha <0": (["gaussian", "--set", "task.alpha=-2"], ["alpha=-2.0", "positive"]),
    "method alpha <0": (["gmm1", "--set", "method.alpha=-1"], ["method.alpha=-1.0", "> 0"]),
    "method alpha 0": (["gmm1", "--set", "method.alpha=0"], ["method.alpha=0.0", "> 0"]),
    "gamma 0": (["gmm1", "--set", "method.gamma=0"], ["method.gamma=0.0", "(0, 1]"]),
    "gamma 1.5": (["gmm1", "--set", "method.gamma=1.5"], ["method.gamma=1.5", "(0, 1]"]),
    "eta 1.5": (["gmm1", "--set", "task.eta=1.5"], ["eta=1.5", "[0, 1]"]),
    "eta <0": (["gmm1", "--set", "task.eta=-0.1"], ["eta=-0.1", "[0, 1]"]),
    "buffer < batch": (["gmm1", "--set", "method.buffer_size=8", "--set", "method.batch_size=16"],
                       ["method.buffer_size=8", "method.batch_size=16", "raise buffer_size"]),
    "steps 0": (["gmm1", "--steps", "0"], ["trainer.steps=0", ">= 1"]),
    "missing config file": (["gmm1", "--config", "/nonexistent/c.yaml"], ["/nonexistent/c.yaml", "does not exist"]),
}


@pytest.mark.parametrize("argv,needles", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, needles):
    out_dir = tmp_path / "out"
    code, _, err = _cli(capsys, "train", *argv, "--out", str(out_dir), *SMALL)
    assert code == 2
    line = _one_error_line(err)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not out_dir.exists()  # bad input is refused before anything is written


def test_unknown_task_gmm_suggests_gmm1(capsys):
    code, _, err = _cli(capsys, "train", "gmm", *SMALL)
    assert code == 2
    assert "did you mean 'gmm1'" in _one_error_line(err)


def test_bad_yaml_config_file(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  gamm: 0.9\n")
    code, _, err = _cli(capsys, "train", "gmm1", "--config", str(path), "--out", str(tmp_path / "o"), *SMALL)
    assert code == 2
    assert "did you mean method.gamma" in _one_error_line(err)


# ---- broken rewards --------------------------------------------------------------------------------------------


def _task_with_reward(reward):
    def factory(config: TaskConfig) -> MixtureTask:
        base = GaussianMixture(torch.zeros(1, 2), torch.eye(2)[None], torch.ones(1))
        return MixtureTask(base, reward, 1.0, config, name="broken", description="a task with a broken reward")

    return factory


def _nan_reward(x, cond=None):
    r = x.sum(1)
    return torch.where(torch.arange(x.shape[0]) == 0, torch.full_like(r, float("nan")), r)


def _nan_in_training(x, cond=None):
    # fine when sampling and evaluating (no grad), NaN on SQDF's differentiable x0 estimates
    return x.sum(1) * (float("nan") if x.requires_grad else 1.0)


def _wrong_shape(x, cond=None):
    return x.sum(1, keepdim=True)


def _raises(x, cond=None):
    raise KeyError("no such feature")


BROKEN = {
    "nan": (_nan_reward, ["broken reward", "1 NaN/inf values out of", "finite"]),
    "nan in training": (_nan_in_training, ["broken reward", "16 NaN/inf values out of 16", "finite"]),
    "wrong shape": (_wrong_shape, ["broken reward", "shape (64, 1)", "shape [64]"]),
    "raises": (_raises, ["broken reward", "raised KeyError", "no such feature", "fix the reward"]),
}


@pytest.mark.parametrize("reward,needles", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_reward_exits_2_with_one_line(capsys, monkeypatch, tmp_path, reward, needles):
    monkeypatch.setitem(sqdf.tasks.TASKS, "broken", _task_with_reward(reward))
    # the default SQDF reads rollout rewards only; the paper's differentiates the reward at x0 estimates
    method = "sqdf-paper" if reward is _nan_in_training else "sqdf"
    code, _, err = _cli(capsys, "train", "broken", "--method", method, "--steps", "3", "--out", str(tmp_path / "o"),
                        *SMALL)
    assert code == 2
    line = _one_error_line(err)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not (tmp_path / "o" / "summary.json").exists()


def test_healthy_custom_task_trains(capsys, monkeypatch, tmp_path):
    # the same registration with a good reward runs: the failures above come from the rewards alone
    monkeypatch.setitem(sqdf.tasks.TASKS, "custom", _task_with_reward(lambda x, cond=None: x.sum(1)))
    code, out, err = _cli(capsys, "train", "custom", "--steps", "2", "--out", str(tmp_path / "o"), *SMALL)
    assert code == 0, err
    assert _summary(tmp_path / "o")["iterations"] == 2


# ---- sqdf train --out refuses a run with checkpoints -----------------------------------------------------------


@pytest.mark.parametrize("task", ["gaussian", "gmm1"])
def test_train_refuses_an_out_dir_with_checkpoints(capsys, run_copy, task):
    before = _digest(run_copy)
    code, _, err = _cli(capsys, "train", task, "--steps", "2", "--out", str(run_copy), *SMALL)
    assert code == 2
    line = _one_error_line(err)
    assert str(run_copy) in line and "already holds a run with checkpoints" in line
    assert f"sqdf resume {run_copy}" in line and "another --out" in line
    assert _digest(run_copy) == before  # not a byte changed: checkpoints, config, metrics, summary


# ---- sqdf resume -----------------------------------------------------------------------------------------------


def test_resume_nonexistent_dir(capsys, tmp_path):
    missing = tmp_path / "nope"
    code, _, err = _cli(capsys, "resume", str(missing))
    assert code == 2
    line = _one_error_line(err)
    assert str(missing) in line and "does not exist" in line and "--out DIR" in line
    assert not missing.exists()


def test_resume_dir_that_is_not_a_run(capsys, tmp_path):
    code, _, err = _cli(capsys, "resume", str(tmp_path))
    assert code == 2
    line = _one_error_line(err)
    assert str(tmp_path) in line and "config.yaml" in line


@pytest.mark.parametrize("remove_folder", [False, True])
def test_resume_run_without_checkpoints(capsys, run_copy, remove_folder):
    folder = run_copy / "checkpoints"
    if remove_folder:
        shutil.rmtree(folder)
    else:
        for name in os.listdir(folder):
            os.remove(folder / name)
    before = _digest(run_copy)
    code, _, err = _cli(capsys, "resume", str(run_copy))
    assert code == 2
    line = _one_error_line(err)
    assert "no checkpoint" in line and str(folder) in line and "sqdf train" in line
    assert _digest(run_copy) == before


def test_resume_corrupted_newest_checkpoint_then_follow_the_advice(capsys, finished_run, run_copy):
    newest = run_copy / "checkpoints" / "ckpt_0000004.pt"
    size = newest.stat().st_size
    with open(newest, "r+b") as fh:
        fh.truncate(size // 2)
    before = _digest(run_copy)
    code, _, err = _cli(capsys, "resume", str(run_copy))
    assert code == 2
    line = _one_error_line(err)
    assert str(newest) in line and "corrupted" in line
    assert "delete it to resume from the older ckpt_0000002.pt" in line
    assert _digest(run_copy) == before  # a failed resume changes nothing

    os.remove(newest)
    code, _, err = _cli(capsys, "resume", str(run_copy))
    assert code == 0, err
    assert _summary(run_copy) == _summary(finished_run)  # iterations 3-4 redone exactly


def test_resume_steps_below_done(capsys, run_copy):
    code, _, err = _cli(capsys, "resume", str(run_copy), "--steps", "3")
    assert code == 2
    line = _one_error_line(err)
    assert "--steps 3" in line and "4 iterations already done" in line


# ---- the same through a real process ---------------------------------------------------------------------------


def _subprocess(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sqdf.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_subprocess_exit_codes(run_copy, tmp_path):
    # one process per outcome: bad config, bad task, corrupted checkpoint, argparse usage error, success
    res = _subprocess("train", "gmm1", "--set", "method.gamm=0.9", "--out", str(tmp_path / "a"))
    assert res.returncode == 2
    assert "did you mean method.gamma" in _one_error_line(res.stderr)

    res = _subprocess("train", "gmx1", "--out", str(tmp_path / "b"))
    assert res.returncode == 2
    assert "did you mean 'gmm1'" in _one_error_line(res.stderr)

    newest = run_copy / "checkpoints" / "ckpt_0000004.pt"
    with open(newest, "r+b") as fh:
        fh.truncate(100)
    res = _subprocess("resume", str(run_copy))
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert str(newest) in line and "ckpt_0000002.pt" in line

    res = _subprocess("train", "gmm1", "--steps", "many")  # argparse's own usage error, also 2
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--steps" in res.stderr

    res = _subprocess("tasks")
    assert res.returncode == 0 and res.stderr.strip() == ""
    assert any(line.startswith("gmm1") and "-1.4397" in line for line in res.stdout.splitlines())


def test_console_script_is_installed():
    script = shutil.which("sqdf", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("no `sqdf` console script next to this interpreter")
    res = subprocess.run([script, "train", "gmm1", "--method", "sqd"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "did you mean 'sqdf'" in _one_error_line(res.stderr)
