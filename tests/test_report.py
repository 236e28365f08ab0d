"""`multitower report`: one self-contained HTML page from real runs, checked by rendering
it in headless Chromium when that is installed."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from multitower.cli import main
from multitower.config import Config, DataConfig, OptimConfig, ParallelConfig, RunConfig
from multitower.report import config_differences, load_runs, render

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def tiny_run(data_dir: Path, run_dir: Path, *, lr: float = 0.1, batch_size: int = 32, evaluate: bool = True) -> Path:
    """20 real training steps of cifar10-tf in this process; one evaluation when asked."""
    from multitower.eval import evaluate_run
    from multitower.train.loop import train
    cfg = Config(data=DataConfig(dir=str(data_dir), batch_size=batch_size), optim=OptimConfig(lr=lr),
                 parallel=ParallelConfig(strategy="single"),
                 run=RunConfig(run_dir=str(run_dir), steps=20, log_every=2, summary_every=0,
                               checkpoint_every=20, progress="off"))
    train(cfg.validate())
    if evaluate:
        evaluate_run(run_dir, batch_size=256)
    return run_dir


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory) -> list[Path]:
    """Two real runs: one evaluated, one (other lr and batch) never evaluated."""
    root = tmp_path_factory.mktemp("runs")
    return [tiny_run(synth_dir, root / "evaluated"),
            tiny_run(synth_dir, root / "unevaluated", lr=0.05, batch_size=16, evaluate=False)]


def test_report_compares_runs_and_marks_the_unevaluated_one(runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    for heading in ("Runs", "Configuration differences", "Loss", "Precision @ 1", "Throughput and communication",
                    "Per-class accuracy", "Confusion matrices"):
        assert f"<h2>{heading}</h2>" in page, heading
    assert "not evaluated" in page and "Not evaluated: unevaluated" in page
    assert page.count('src="data:image/png;base64,') >= 5
    # Self-contained: nothing fetched from anywhere.
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page


def test_config_differences_only_the_keys_that_differ(runs):
    loaded = load_runs(runs)
    keys = {key for key, _ in config_differences(loaded)}
    assert keys == {"optim.lr", "data.batch_size", "run.run_dir"}
    values = dict(config_differences(loaded))["optim.lr"]
    assert values == ["0.1", "0.05"]


def test_a_bare_run_renders_without_metrics_or_eval(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(Config().to_json())
    (bare / "metrics.jsonl").write_text('{"step": 10, "loss"')  # a torn line from a run still writing
    page = render(load_runs([bare]))
    assert "no metrics" in page and "not evaluated" in page and "One run: nothing to compare" in page


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "is not a multitower run directory (no config.json)"),
    (lambda d: None, "is not a multitower run directory"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "is unreadable"),
])
def test_not_a_run_is_one_line(tmp_path, capsys, make, message):
    target = tmp_path / "target"
    make(target)
    assert main(["report", str(target), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(target) in err[0]
    assert not (tmp_path / "r.html").exists()


def test_dry_run_lists_runs_and_writes_nothing(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r.html"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "evaluated: single, 10 metrics records, last evaluated at step 20" in out
    assert "unevaluated: single, 10 metrics records, not evaluated" in out
    assert not (tmp_path / "r.html").exists()


def screenshot(html: Path, png: Path, profile: Path) -> Image.Image:
    """Render `html` in headless Chromium at 1200 x 2000 and return the screenshot."""
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,2000",
                    html.resolve().as_uri()], capture_output=True, timeout=120, check=False)
    assert png.exists(), "chromium wrote no screenshot"
    return Image.open(png).convert("RGB")


def assert_not_blank(image: Image.Image) -> None:
    assert image.size == (1200, 2000)
    colours = image.getcolors(1 << 24)
    assert len(colours) > 200, f"only {len(colours)} colours: a blank or unstyled page"
    # The plots live below the tables: a good share of that area is drawn on, not page background.
    plot_area = image.crop((40, 700, 1160, 1900))
    background = {(255, 255, 255), (244, 246, 249)}
    inked = sum(count for count, colour in plot_area.getcolors(1 << 24) if colour not in background)
    assert inked / (plot_area.width * plot_area.height) > 0.03


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert_not_blank(screenshot(out, tmp_path / "shot.png", tmp_path / "chromium-profile"))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_single_against_two_worker_sync_through_the_cli(synth_dir, runs, tmp_path):
    """The report's main use: a 2-worker sync run (launched by the CLI) against a single one."""
    sync_dir = tmp_path / "sync"
    trained = subprocess.run([sys.executable, "-m", "multitower", "train", "--data", str(synth_dir),
                              "--run-dir", str(sync_dir), "--workers", "2", "--strategy", "sync", "--steps", "20",
                              "--batch-size", "32", "--log-every", "2", "--summary-every", "0",
                              "--checkpoint-every", "20", "--progress", "off"],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "report.html"
    assert main(["report", str(runs[0]), str(sync_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert "parallel.workers" in page and "sync" in page
    records = [json.loads(line) for line in (sync_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["world_size"] == 2
    assert_not_blank(screenshot(out, tmp_path / "shot.png", tmp_path / "chromium-profile"))
