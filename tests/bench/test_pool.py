"""The bench process pool: rows come back in spec order, in-process and in spawn workers; failures are rows."""

from __future__ import annotations

from dataclasses import dataclass

from sqdf.bench.pool import error_row, execute, machine_text


@dataclass(frozen=True)
class Spec:
    task: str
    method: str
    seed: int
    run_dir: str

    @property
    def label(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"


def square_seed(spec: Spec) -> dict:
    if spec.seed == 2:
        raise RuntimeError("boom")
    return {"seed": spec.seed, "value": spec.seed**2}


def guarded(spec: Spec) -> dict:
    try:
        return square_seed(spec)
    except RuntimeError as exc:
        return error_row(spec, str(exc))


def test_execute_keeps_spec_order_in_process_and_in_a_pool(tmp_path):
    specs = [Spec("t", "m", s, str(tmp_path / str(s))) for s in range(4)]
    rows = execute(specs, 1, guarded)
    assert [r.get("value") for r in rows] == [0, 1, None, 9]
    assert rows[2] == {"task": "t", "method": "m", "seed": 2, "run_dir": specs[2].run_dir, "error": "boom"}
    pooled = execute(specs, 2, square_seed)  # an exception in a worker becomes an error row too
    assert [r.get("value") for r in pooled] == [0, 1, None, 9]
    assert pooled[2]["error"] == "RuntimeError: boom"


def test_machine_text_names_cores_and_torch():
    text = machine_text()
    assert " cores, torch " in text
