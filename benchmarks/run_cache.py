"""Shared by the benchmark scripts: run one `sqdf train` unless its run directory already has a summary."""

from __future__ import annotations

import json
import os

from sqdf.cli import main as cli_main


def train_or_load(argv: list[str], out: str, overrides: list[str]) -> dict:
    """summary.json of `sqdf train ARGV --out OUT --set trainer.progress=false [--set OVERRIDE ...]`, running it
    only when OUT has no summary yet (so an interrupted benchmark resumes where it stopped)."""
    if not os.path.exists(os.path.join(out, "summary.json")):
        argv = [*argv, "--out", out, "--set", "trainer.progress=false"]
        for item in overrides:
            argv += ["--set", item]
        if cli_main(argv) != 0:
            raise SystemExit(f"run failed: {argv}")
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)
