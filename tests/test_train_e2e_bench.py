"""benchmarks/train_e2e.py in its CI-sized form (--quick): every case runs the real train
command and the step benchmark, and the JSON has the figures; no target is asserted (a few
steps on a shared CI machine measure nothing)."""

import json
import subprocess
import sys
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]


def test_quick_end_to_end_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "train_e2e.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_e2e.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "GENERATED" in done.stdout and "loop efficiency" in done.stdout and "2x1 / 1x2 job" in done.stdout
    result = json.loads(out.read_text())
    assert result["environment"]["torch"] and result["config"]["quick"] and result["config"]["generated_data"]
    cases = result["results"]
    assert set(cases) == {"tutorial", "workers2", "fast"}
    for name in ("tutorial", "fast"):
        assert cases[name]["loop_efficiency"] > 0 and cases[name]["step_images_per_sec"]["median"] > 0, name
    assert cases["workers2"]["scaling_2x1_over_1x2"] > 0
    paired = cases["workers2"]["scaling_per_repetition"]
    assert len(paired) == result["config"]["reps"] and cases["workers2"]["scaling_paired_median"] == median(paired)
    assert paired == [two / one for two, one in zip(cases["workers2"]["job_images_per_sec"]["all"],
                                                     cases["tutorial"]["job_images_per_sec"]["all"])]
    for case in cases.values():
        assert case["job_images_per_sec"]["median"] > 0 and case["peak_rss_bytes"] > 50 * 2**20
