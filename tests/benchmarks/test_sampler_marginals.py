"""benchmarks/sampler_marginals.py writes one row per sampler, and the rows say what the closed form says."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
    spec = importlib.util.spec_from_file_location("sampler_marginals",
                                                  os.path.join(ROOT, "benchmarks", "sampler_marginals.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_has_every_sampler_and_the_sde_step_is_closest(tmp_path, monkeypatch, capsys):
    script = _script()
    out = tmp_path / "m.md"
    monkeypatch.setattr("sys.argv", ["sampler_marginals.py", "--steps", "10,28", "--out", str(out)])
    script.main()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| VP") or line.startswith("| flow")]
    assert len(rows) == len(list(script.samplers())) == 10
    errors = {row.split(" | ")[0][2:]: float(row.split(" | ")[2].strip(" |%")) for row in rows}  # the T=28 column
    assert all(v < 0 for v in errors.values())
    assert errors["flow shift 3 (SD3), SDE a = 0.7"] == -6.9
    assert errors["flow shift 3 (SD3), SDE a = 0.7"] > errors["flow shift 3 (SD3), DDIM eta 0"]
    assert "T=28" in capsys.readouterr().out
