"""Online labels of the policy's own samples: who answers "which of a and b is better", behind a budget and a log.

A labeller maps pairs (a [P, *shape], b [P, *shape], cond [P, ...] or None) to labels [P] in {0, 0.5, 1} (1: a won,
0.5: a tie). Three kinds:

* ``RewardLabeller``: Bradley-Terry on a reward at a temperature (the simulated annotator of the benchmarks);
  its coin for a pair is a function of (seed, pair id) alone, so a resumed run draws the same labels;
* ``HTTPLabeller``: a person or a program behind a localhost HTTP server, POSTed {"a", "b", "cond"} as JSON and
  answering {"labels": [...]};
* ``AnswerFileLabeller``: answers from a jsonl file of {"pair": ID, "label": 0 | 0.5 | 1}; pairs it does not hold
  are written as questions (DIR/questions.jsonl with the tensors beside it) and the run stops with
  ``LabelsPending`` naming the file, to be resumed once they are answered.

``LabelLog`` wraps any labeller with a hard budget (in labels) and a durable log: every answered call is written
(one safetensors file and one fsynced line of labels.jsonl) before its labels are returned, and a log reopened on
the same folder answers pairs it already holds without asking or charging again, so a crash loses no label and
a resumed run pays for none twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from typing import Callable

import torch

from ..errors import ConfigError, SqdfError

LABEL_VALUES = (0.0, 0.5, 1.0)


class LabelBudgetExceeded(SqdfError):
    """A labelling call would need more new labels than the budget has left."""


class LabelsPending(SqdfError):
    """The answer file does not hold every pair asked; the questions were written for a person or program."""


def pair_ids(a: torch.Tensor, b: torch.Tensor, cond: torch.Tensor | None = None) -> list[str]:
    """A content hash per ordered pair (a_i, b_i, cond_i): the same float32 values give the same id. a, b [P, ...]."""
    if a.shape != b.shape:
        raise ConfigError(f"pair samples a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    xa = a.detach().to(torch.float32).cpu().contiguous()
    xb = b.detach().to(torch.float32).cpu().contiguous()
    cs = None if cond is None else cond.detach().cpu().contiguous()
    out = []
    for i in range(xa.shape[0]):
        h = hashlib.sha1(xa[i].numpy().tobytes())
        h.update(b"|")
        h.update(xb[i].numpy().tobytes())
        if cs is not None:
            h.update(str(cs[i].dtype).encode())
            h.update(cs[i].numpy().tobytes())
        out.append(h.hexdigest()[:20])
    return out


def check_labels(values, n: int, source: str) -> torch.Tensor:
    """Labels as float32 [n] in {0, 0.5, 1}, or a ConfigError naming ``source`` and the bad value."""
    try:
        y = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source} returned labels that are not numbers ({exc}); answer 0, 0.5 or 1 per pair")
    if y.shape != (n,):
        raise ConfigError(f"{source} returned {y.numel()} labels for {n} pairs; answer one label per pair")
    bad = [float(v) for v in y if float(v) not in LABEL_VALUES]
    if bad:
        raise ConfigError(f"{source} returned label {bad[0]!r}; labels must be 1 (a won), 0 (b won) or 0.5 (tie)")
    return y.to(torch.float32)


class Labeller(ABC):
    """``labeller(a, b, cond) -> labels [P]`` in {0, 0.5, 1} (1: a won)."""

    @abstractmethod
    def label(self, a: torch.Tensor, b: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Labels [P] of pairs a, b [P, *shape] under conditions cond [P, ...] or None."""

    def __call__(self, a: torch.Tensor, b: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.label(a, b, cond)


class RewardLabeller(Labeller):
    """Bradley-Terry labels P(a wins) = sigmoid((r(a) - r(b)) / temperature) of ``reward(x, cond) -> [B]``
    (temperature 0: the deterministic comparison, ties 0.5). Each pair's coin is drawn from (seed, pair id)."""

    def __init__(self, reward: Callable, temperature: float = 1.0, seed: int = 0):
        if not temperature >= 0:
            raise ConfigError(f"label temperature={temperature} must be >= 0 (0: deterministic comparison)")
        self.reward, self.temperature, self.seed = reward, float(temperature), int(seed)

    def label(self, a, b, cond):
        with torch.no_grad():
            r = self.reward(torch.cat([a, b]), None if cond is None else torch.cat([cond, cond]))
        r = torch.as_tensor(r, dtype=torch.float64).detach().cpu().reshape(-1)
        diff = r[: a.shape[0]] - r[a.shape[0]:]
        if self.temperature == 0:
            return torch.where(diff > 0, 1.0, torch.where(diff < 0, 0.0, 0.5)).to(torch.float32)
        p = torch.sigmoid(diff / self.temperature)
        u = torch.tensor([_uniform(self.seed, key) for key in pair_ids(a, b, cond)], dtype=torch.float64)
        return (u < p).to(torch.float32)


def _uniform(seed: int, key: str) -> float:
    g = torch.Generator().manual_seed((seed * 1_000_003 + int(key[:15], 16)) % (2**63))
    return float(torch.rand((), generator=g, dtype=torch.float64))


class HTTPLabeller(Labeller):
    """A labeller behind a localhost server: POST {"a": [...], "b": [...], "cond": [...] | null} (JSON nested
    lists), answer {"labels": [P numbers in {0, 0.5, 1}]}."""

    def __init__(self, url: str, timeout: float = 3600.0):
        import urllib.parse

        host = urllib.parse.urlparse(url).hostname
        if host not in ("localhost", "127.0.0.1", "::1"):
            raise ConfigError(f"labeller url {url!r} must be on localhost (no machine here reaches others); run the "
                              "labelling server locally or forward its port")
        self.url, self.timeout = url, float(timeout)

    def label(self, a, b, cond):
        import urllib.error
        import urllib.request

        body = json.dumps({"a": a.detach().cpu().tolist(), "b": b.detach().cpu().tolist(),
                           "cond": None if cond is None else cond.detach().cpu().tolist()}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                answer = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ConfigError(f"labeller {self.url} did not answer ({type(exc).__name__}: {exc}); start the "
                              "labelling server, or check its url") from exc
        if not isinstance(answer, dict) or "labels" not in answer:
            raise ConfigError(f"labeller {self.url} answered without a 'labels' field; reply {{\"labels\": [..]}}")
        return check_labels(answer["labels"], a.shape[0], f"labeller {self.url}")


class AnswerFileLabeller(Labeller):
    """Answers from ``answers`` (jsonl lines {"pair": ID, "label": 0 | 0.5 | 1}, read at every call, so answers
    added while a run waits are seen on resume). Pairs without an answer are appended to ``questions_dir``
    (questions.jsonl: {"pair", "file", "index"}; the tensors a, b, cond in the safetensors file named) and the call
    raises LabelsPending."""

    def __init__(self, answers: str, questions_dir: str):
        self.answers, self.questions_dir = answers, questions_dir

    def _read(self) -> dict[str, float]:
        if not os.path.exists(self.answers):
            return {}
        out = {}
        with open(self.answers, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    key, value = str(row["pair"]), float(row["label"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(f"answer file {self.answers!r} line {n}: {type(exc).__name__} {exc}; each "
                                      'line must be {"pair": ID, "label": 0 | 0.5 | 1}') from exc
                if value not in LABEL_VALUES:
                    raise ConfigError(f"answer file {self.answers!r} line {n}: label {value!r} must be 1 (a won), 0 "
                                      "(b won) or 0.5 (tie)")
                out[key] = value
        return out

    def label(self, a, b, cond):
        ids = pair_ids(a, b, cond)
        known = self._read()
        missing = [i for i, key in enumerate(ids) if key not in known]
        if missing:
            path = self._ask(a, b, cond, ids, missing)
            raise LabelsPending(f"{len(missing)} pairs need labels: questions in {path}; append lines "
                                f'{{"pair": ID, "label": 1 | 0 | 0.5}} to {self.answers} and resume the run')
        return torch.tensor([known[key] for key in ids], dtype=torch.float32)

    def _ask(self, a, b, cond, ids, missing) -> str:
        from safetensors.torch import save_file

        os.makedirs(self.questions_dir, exist_ok=True)
        rows = torch.tensor(missing)
        name = f"questions_{ids[missing[0]]}.safetensors"
        tensors = {"a": a.detach().cpu()[rows].contiguous(), "b": b.detach().cpu()[rows].contiguous()}
        if cond is not None:
            tensors["cond"] = cond.detach().cpu()[rows].contiguous()
        tmp = os.path.join(self.questions_dir, f"{name}.tmp{os.getpid()}")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(self.questions_dir, name))
        path = os.path.join(self.questions_dir, "questions.jsonl")
        with open(path, "a") as fh:
            for j, i in enumerate(missing):
                fh.write(json.dumps({"pair": ids[i], "file": name, "index": j}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return path


class LabelLog:
    """``labeller`` behind a hard ``budget`` of labels and a durable log in ``log_dir`` (None: in memory only).

    ``log(a, b, cond) -> labels [P]``: pairs already labelled (same ids) are answered from the log at no charge;
    the rest are asked in one call, logged, then returned. ``spent``: labels paid for, across restarts.
    """

    def __init__(self, labeller: Callable, budget: int = 0, log_dir: str | None = None):
        if budget < 0:
            raise ConfigError(f"label budget={budget} must be >= 0 (0: no limit)")
        self.labeller, self.budget, self.log_dir = labeller, int(budget), log_dir
        self.answers: dict[str, float] = {}
        self._calls = 0
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self._reload()

    @property
    def spent(self) -> int:
        return len(self.answers)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        ids = pair_ids(a, b, cond)
        first: dict[str, int] = {}
        for i, key in enumerate(ids):
            if key not in self.answers:
                first.setdefault(key, i)
        if first and self.budget and len(first) > self.budget - self.spent:
            raise LabelBudgetExceeded(f"labelling needs {len(first)} new labels but only {self.budget - self.spent} "
                                      f"of the budget of {self.budget} are left; raise trainer.label_budget")
        if first:
            rows = torch.tensor(list(first.values()), device=a.device)
            ca = None if cond is None else cond[rows]
            labels = check_labels(self.labeller(a[rows], b[rows], ca), len(first), "the labeller")
            self._log(a[rows], b[rows], ca, list(first), labels)
            for key, v in zip(first, labels.tolist()):
                self.answers[key] = float(v)
        return torch.tensor([self.answers[key] for key in ids], dtype=torch.float32, device=a.device)

    def within_budget(self, a: torch.Tensor, b: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Like calling the log, but pairs beyond the budget's end get 0.5 (a tie: no information, no gradient in
        the DPO losses) instead of raising, so a run's last iteration can use what the budget still buys."""
        if not self.budget:
            return self(a, b, cond)
        ids = pair_ids(a, b, cond)
        left = self.budget - self.spent
        keep, new = [], set()
        for i, key in enumerate(ids):
            if key in self.answers or key in new or len(new) < left:
                if key not in self.answers:
                    new.add(key)
                keep.append(i)
        out = torch.full((len(ids),), 0.5, dtype=torch.float32, device=a.device)
        if keep:
            rows = torch.tensor(keep, device=a.device)
            out[rows] = self(a[rows], b[rows], None if cond is None else cond[rows])
        return out

    @property
    def exhausted(self) -> bool:
        return bool(self.budget) and self.spent >= self.budget

    def _log(self, a, b, cond, ids: list[str], labels: torch.Tensor) -> None:
        if self.log_dir is None:
            return
        from safetensors.torch import save_file

        self._calls += 1
        name = f"labels_{self.spent:09d}_{self._calls:06d}.safetensors"
        tensors = {"a": a.detach().to(torch.float32).cpu().contiguous(),
                   "b": b.detach().to(torch.float32).cpu().contiguous(), "labels": labels.to(torch.float32)}
        if cond is not None:
            tensors["cond"] = cond.detach().cpu().contiguous()
        path = os.path.join(self.log_dir, name)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"ids": json.dumps(ids)})
        os.replace(tmp, path)
        with open(os.path.join(self.log_dir, "labels.jsonl"), "a") as fh:
            fh.write(json.dumps({"file": name, "ids": ids, "labels": labels.tolist()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _files(self) -> list[str]:
        return sorted(f for f in os.listdir(self.log_dir) if f.startswith("labels_") and f.endswith(".safetensors"))

    def _reload(self) -> None:
        from safetensors import safe_open

        for name in self._files():
            try:
                with safe_open(os.path.join(self.log_dir, name), framework="pt") as fh:
                    ids = json.loads(fh.metadata()["ids"])
                    labels = fh.get_tensor("labels").tolist()
            except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
                raise ConfigError(f"label log file {os.path.join(self.log_dir, name)!r} is unreadable "
                                  f"({type(exc).__name__}); move it away to re-ask its pairs") from exc
            for key, v in zip(ids, labels):
                self.answers[key] = float(v)
            self._calls += 1
        if self.budget and self.spent > self.budget:
            raise ConfigError(f"the label log in {self.log_dir!r} already holds {self.spent} labels, more than the "
                              f"budget of {self.budget}; raise trainer.label_budget or use another run folder")

    def logged(self) -> dict[str, torch.Tensor]:
        """Every logged pair: {'a', 'b', 'labels', 'cond' if any}, in labelling order ({} when nothing is)."""
        from safetensors.torch import load_file

        if self.log_dir is None:
            raise ConfigError("this label log has no log_dir, so nothing was logged")
        parts = [load_file(os.path.join(self.log_dir, f)) for f in self._files()]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def make_labeller(spec: str, run_dir: str | None) -> Labeller:
    """The labeller named by ``trainer.labeller``: 'http://localhost:PORT/PATH' or 'answers:PATH' (questions go
    to RUN_DIR/questions)."""
    if spec.startswith(("http://", "https://")):
        return HTTPLabeller(spec)
    if spec.startswith("answers:") and len(spec) > len("answers:"):
        return AnswerFileLabeller(spec[len("answers:"):], os.path.join(run_dir or ".", "questions"))
    raise ConfigError(f"trainer.labeller={spec!r} must be 'http://localhost:PORT/PATH' (a labelling server) or "
                      "'answers:PATH' (a jsonl file of answers); leave it unset to label by the task reward")
