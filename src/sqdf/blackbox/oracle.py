"""An expensive black-box reward behind a hard query budget, with observation noise and a durable query log.

Every answered query is written to ``log_dir`` before it is returned: one safetensors file per call (samples,
conditions, ids, noisy values) and one line in ``queries.jsonl``, flushed and fsynced, so a crash or a kill loses
no paid-for label. A sample is identified by a hash of its contents (and condition); an oracle reopened on the
same ``log_dir`` answers samples it has already paid for from the log without asking again and without charging
the budget twice. Slow oracles can be asked in parallel chunks (``workers``), or live behind a localhost HTTP
server (``http_reward``).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ..errors import ConfigError, RewardError, SqdfError


class BudgetExceeded(SqdfError):
    """A query would spend more oracle calls than the budget has left."""


def sample_ids(x: torch.Tensor, cond: torch.Tensor | None = None) -> list[str]:
    """A content hash per sample (and its condition): the same float32 values give the same id. x [B, ...]."""
    xs = x.detach().to(torch.float32).cpu().contiguous()
    cs = None if cond is None else cond.detach().cpu().contiguous()
    out = []
    for i in range(xs.shape[0]):
        h = hashlib.sha1(xs[i].numpy().tobytes())
        if cs is not None:
            h.update(str(cs[i].dtype).encode())
            h.update(cs[i].numpy().tobytes())
        out.append(h.hexdigest()[:20])
    return out


class Oracle:
    """Wraps ``fn(x [B, ...], cond or None) -> [B]`` (a true reward that is expensive to ask).

    Args:
        fn: the black box; called only on samples not already in the log.
        budget: the most samples it may ever score (hard: a query that does not fit raises BudgetExceeded).
        noise_std: std of Gaussian observation noise added to each answer (as the official aesthetic + N(0, 0.1^2)).
        seed: seed of the noise.
        log_dir: folder of the query log (None: nothing on disk, and no resume).
        workers: > 0 asks ``fn`` in that many parallel chunks from a thread pool (for slow, I/O-bound oracles).
    """

    def __init__(self, fn: Callable, budget: int, noise_std: float = 0.0, seed: int = 0, log_dir: str | None = None,
                 workers: int = 0):
        if budget < 1:
            raise ConfigError(f"oracle budget={budget} must be >= 1 (the number of samples it may score)")
        if noise_std < 0:
            raise ConfigError(f"oracle noise_std={noise_std} must be >= 0")
        if workers < 0:
            raise ConfigError(f"oracle workers={workers} must be >= 0 (0: ask in the calling thread)")
        self.fn, self.budget, self.noise_std, self.workers = fn, int(budget), float(noise_std), int(workers)
        self.seed = int(seed)
        self.log_dir = log_dir
        self.answers: dict[str, float] = {}  # id -> logged (noisy) value
        self._calls = 0
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self._reload()

    @property
    def spent(self) -> int:
        """Samples scored so far (each charged once, across restarts)."""
        return len(self.answers)

    @property
    def remaining(self) -> int:
        return self.budget - self.spent

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy oracle values [B] (float32, on x's device); answers from the log where already paid for."""
        ids = sample_ids(x, cond)
        new = [i for i, key in enumerate(ids) if key not in self.answers]
        new_keys = list(dict.fromkeys(ids[i] for i in new))
        if len(new_keys) > self.remaining:
            raise BudgetExceeded(f"the oracle query needs {len(new_keys)} new labels but only {self.remaining} of the "
                                 f"budget of {self.budget} are left ({self.spent} spent); query fewer samples or "
                                 "raise the budget")
        if new:
            first = {}
            for i in new:
                first.setdefault(ids[i], i)
            rows = torch.tensor(list(first.values()), device=x.device)
            xs = x.detach()[rows]
            cs = None if cond is None else cond[rows]
            values = self._ask(xs, cs)
            if self.noise_std > 0:
                values = values + self.noise_std * self._noise(list(first))
            self._log(xs, cs, list(first), values)
            for key, v in zip(first, values.tolist()):
                self.answers[key] = float(v)
        return torch.tensor([self.answers[key] for key in ids], dtype=torch.float32, device=x.device)

    # ---- internals ---------------------------------------------------------------------------------------------
    def _noise(self, keys: list[str]) -> torch.Tensor:
        """Standard normal noise per sample, a function of (seed, sample id) only: a resumed run that buys the
        remaining labels in another order or another process draws the same noise for the same sample."""
        out = torch.empty(len(keys), dtype=torch.float64)
        for i, key in enumerate(keys):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(key[:15], 16)) % (2**63))
            out[i] = torch.randn((), generator=g, dtype=torch.float64)
        return out

    def _ask(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        def one(rows: slice) -> torch.Tensor:
            try:
                r = self.fn(x[rows], None if cond is None else cond[rows])
            except Exception as exc:  # noqa: BLE001 - any failure of the user's oracle is reported the same way
                raise RewardError(f"the oracle raised {type(exc).__name__}: {exc}; nothing was charged for this "
                                  "query") from exc
            r = torch.as_tensor(r, dtype=torch.float64).detach().cpu().reshape(-1)
            n = rows.stop - rows.start
            if r.shape != (n,):
                raise RewardError(f"the oracle returned {tuple(r.shape)} values for {n} samples; it must return [B]")
            if not torch.isfinite(r).all():
                raise RewardError("the oracle returned NaN/inf; nothing was charged for this query")
            return r

        n = x.shape[0]
        if self.workers <= 1 or n < 2:
            return one(slice(0, n))
        size = -(-n // self.workers)
        parts = [slice(s, min(s + size, n)) for s in range(0, n, size)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return torch.cat(list(pool.map(one, parts)))

    def _log(self, x: torch.Tensor, cond: torch.Tensor | None, ids: list[str], values: torch.Tensor) -> None:
        if self.log_dir is None:
            return
        from safetensors.torch import save_file

        self._calls += 1
        name = f"queries_{len(self.answers):09d}_{self._calls:06d}.safetensors"
        path = os.path.join(self.log_dir, name)
        tensors = {"x": x.detach().to(torch.float32).cpu().contiguous(), "values": values.to(torch.float64)}
        if cond is not None:
            tensors["cond"] = cond.detach().cpu().contiguous()
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"ids": json.dumps(ids)})
        os.replace(tmp, path)
        line = json.dumps({"file": name, "ids": ids, "values": values.tolist()})
        with open(os.path.join(self.log_dir, "queries.jsonl"), "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _files(self) -> list[str]:
        return sorted(f for f in os.listdir(self.log_dir) if f.startswith("queries_") and f.endswith(".safetensors"))

    def _reload(self) -> None:
        """Restore the answers of an earlier run from its per-call files (each written atomically before the answer
        was returned; queries.jsonl is the same record in readable form)."""
        from safetensors import safe_open

        for name in self._files():
            with safe_open(os.path.join(self.log_dir, name), framework="pt") as fh:
                ids = json.loads(fh.metadata()["ids"])
                values = fh.get_tensor("values").tolist()
            for key, v in zip(ids, values):
                self.answers[key] = float(v)
            self._calls += 1
        if self.spent > self.budget:
            raise ConfigError(f"the query log in {self.log_dir!r} already holds {self.spent} labels, more than the "
                              f"budget of {self.budget}; raise the budget or use another log folder")

    def logged(self) -> dict[str, torch.Tensor]:
        """Every logged query: {'x': [N, ...], 'values': [N], 'cond': [N, ...] if any} in query order."""
        from safetensors.torch import load_file

        if self.log_dir is None:
            raise ConfigError("this oracle has no log_dir, so nothing was logged")
        parts = [load_file(os.path.join(self.log_dir, f)) for f in self._files()]
        if not parts:
            return {}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def http_reward(url: str, timeout: float = 600.0) -> Callable:
    """A reward fn that POSTs {"x": nested list, "cond": nested list or null} as JSON to a localhost server and
    reads {"values": [B floats]} back (for an oracle that runs in another process, e.g. a lab queue or a simulator)."""
    import urllib.parse
    import urllib.request

    host = urllib.parse.urlparse(url).hostname
    if host not in ("localhost", "127.0.0.1", "::1"):
        raise ConfigError(f"oracle url {url!r} must be on localhost (no machine here reaches others); "
                          "run the oracle server locally or forward its port")

    def fn(x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        body = json.dumps({"x": x.detach().cpu().tolist(),
                           "cond": None if cond is None else cond.detach().cpu().tolist()}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            values = json.loads(resp.read())["values"]
        return torch.tensor(values, dtype=torch.float64)

    return fn
