"""Continue a killed `sqdf blackbox` run of any kind from its folder."""

from __future__ import annotations

from .baselines import BestOfNRun, DirectRun
from .loop import BlackboxRun
from .run_folder import read_saved


def resume_run(out_dir: str):
    """Continue a killed `sqdf blackbox` run of any kind (proxy loop, --direct or --best-of) from its directory."""
    saved = read_saved(out_dir)
    if saved.get("best_of") is not None:
        return BestOfNRun.resume(out_dir)
    return (DirectRun if saved.get("direct") else BlackboxRun).resume(out_dir)
