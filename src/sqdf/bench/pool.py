"""Run bench specs in a spawn process pool (or in-process), one thread per worker, and describe the machine.

A spec is any picklable object with ``task``, ``method``, ``seed``, ``run_dir`` and ``label``; a runner is a
module-level function ``runner(spec) -> row`` (a dict). Shared by ``sqdf bench``, its discretization study and
``sqdf bench --blackbox``.
"""

from __future__ import annotations

import os
import platform
import sys


def machine_text() -> str:
    """'PROCESSOR, N cores, torch VERSION' of this machine."""
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def error_row(spec, error: str) -> dict:
    """The row of a run that failed: its spec's task, method, seed and run_dir, and the error text."""
    return {"task": spec.task, "method": spec.method, "seed": spec.seed, "run_dir": spec.run_dir, "error": error}


def init_worker() -> None:
    """Pool worker setup: one thread per run (the runs are tiny; the pool gives the parallelism)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def execute(specs, jobs: int, runner) -> list[dict]:
    """Run specs through ``runner(spec) -> row`` (a module-level function; in a spawn process pool of `jobs`
    workers, in-process for jobs 1) with a progress bar naming each finished run. Returns rows in spec order."""
    from tqdm.auto import tqdm

    rows: dict[int, dict] = {}
    bar = tqdm(total=len(specs), desc="bench", unit="run", file=sys.stderr)

    def done(i: int, row: dict) -> None:
        rows[i] = row
        status = "FAILED" if "error" in row else "ok"
        bar.set_postfix_str(f"{specs[i].label} {status}")
        bar.update(1)
        if "error" in row:
            tqdm.write(f"sqdf bench: {specs[i].label} failed: {row['error']}", file=sys.stderr)

    try:
        if jobs <= 1:
            for i, spec in enumerate(specs):
                bar.set_description_str(f"bench: {spec.label}")
                done(i, runner(spec))
        else:
            _execute_pool(specs, jobs, done, runner)
    finally:
        bar.close()
    return [rows[i] for i in range(len(specs))]


def _execute_pool(specs, jobs: int, done, runner) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker)
    try:
        futures = {pool.submit(runner, spec): i for i, spec in enumerate(specs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed for memory (BrokenProcessPool)
                row = error_row(specs[i], f"{type(exc).__name__}: {exc}")
            done(i, row)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
