"""`benchmarks/gpu_check.py --device cpu --smoke` runs on any machine and reports what the GPU check
reports on a GPU: the attention paths agree with float64, the dropout masks are the backward's,
the reference logits match, the commands run end to end, and no target is claimed from a smoke run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_TIMEOUT_S = 300


def test_smoke_run_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--json", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["smoke"] is True
    assert {(row["path"], row["precision"]) for row in report["attention_paths"]} >= {
        (path, precision) for path in ("eager", "sdpa", "frugal") for precision in ("fp32", "bf16")}
    for row in report["attention_paths"]:
        bound = 5e-2 if row["precision"] == "bf16" else 1e-5
        assert row["value_error"] < bound and row["gradient_error"] < bound, row
    assert report["dropout_masks"] == {"eager": True, "sdpa": True, "frugal": True}
    if "skipped" not in report["reference_logits"]:
        assert report["reference_logits"]["fp32_within_tolerance"] is True
    assert all(not value["oom"] and value["seconds"] > 0 for value in report["iteration"].values())
    assert set(report["accumulation"]) == {"1", "2"}  # the smoke sizes have 2 groups (the paper's 4: 1, 2, 4)
    assert all(not row["oom"] and row["seconds"] > 0 for row in report["accumulation"].values())
    assert set(report["end_to_end"]) == {"train", "eval", "predict", "torchrun"}
    assert all(step["ok"] for step in report["end_to_end"].values()), report["end_to_end"]
    assert all(target["met"] is None for target in report["targets"].values())
    assert "target bf16_speedup_over_fp32" in done.stdout
