"""The 30-minute soak (issue: reliability): 2 workers, one killed every 3 minutes.
Slow and not in CI (`make test` skips it); run with `pytest -m slow tests/test_soak.py`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_thirty_minutes_of_kills_lose_only_the_work_since_each_checkpoint(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "30",
                             "--kill-every", "180", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["kills_at_s"]) >= 8 and report["restarts"] >= 8
    # Each kill costs at most the steps since the last checkpoint (plus one log window).
    assert report["steps_lost"] <= report["restarts"] * (report["config"]["checkpoint_every"] + 1)
    assert report["final_weights_bitwise_equal"]
    assert report["precision_at_1"]["with_kills"] == report["precision_at_1"]["uninterrupted"]
