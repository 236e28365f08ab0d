"""`multitower report`: one self-contained HTML page from real runs, checked by rendering
it in headless Chromium when that is installed."""

import html as html_module
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from multitower.cli import main
from multitower.config import Config, DataConfig, OptimConfig, ParallelConfig, RunConfig
from multitower.report import CONFUSION_LABEL_PT, DPI, load_runs, per_class_figure, render
from multitower.runs import config_differences, training_clock

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def tiny_run(data_dir: Path, run_dir: Path, *, lr: float = 0.1, batch_size: int = 32, evaluate: bool = True,
             steps: int = 20, resume: bool = False) -> Path:
    """`steps` (20) real training steps of cifar10-tf in this process; one evaluation when asked."""
    from multitower.eval import evaluate_run
    from multitower.train.loop import train
    cfg = Config(data=DataConfig(dir=str(data_dir), batch_size=batch_size), optim=OptimConfig(lr=lr),
                 parallel=ParallelConfig(strategy="single"),
                 run=RunConfig(run_dir=str(run_dir), steps=steps, log_every=2, summary_every=0,
                               checkpoint_every=10, progress="off", resume=resume))
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


DOWNTIME_S = 100.0
RENAMED_CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def renamed_run(synth_dir, tmp_path_factory) -> Path:
    """An evaluated run on another data set: the generated images under other class names."""
    data = tmp_path_factory.mktemp("data") / "animals"
    shutil.copytree(synth_dir, data)
    (data / "batches.meta.txt").write_text("".join(f"{name}\n" for name in RENAMED_CLASSES))
    manifest = json.loads((data / "multitower.json").read_text())
    (data / "multitower.json").write_text(json.dumps({**manifest, "class_names": RENAMED_CLASSES}))
    return tiny_run(data, tmp_path_factory.mktemp("runs") / "animals")


@pytest.fixture(scope="module")
def resumed_run(synth_dir, tmp_path_factory) -> Path:
    """10 steps, evaluated, then resumed to step 20 and not evaluated again (stale). Its
    second segment's clock is moved DOWNTIME_S later, as if resumed the next morning."""
    run_dir = tiny_run(synth_dir, tmp_path_factory.mktemp("runs") / "resumed", steps=10)
    tiny_run(synth_dir, run_dir, steps=20, resume=True, evaluate=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(2, 22, 2))
    for r in records[5:]:
        r["wall_time"] += DOWNTIME_S
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


@pytest.fixture(scope="module")
def torchrun_run(synth_dir, tmp_path_factory) -> Path:
    """8 steps under torchrun with 2 processes: config.json says --workers 1, WORLD_SIZE was 2."""
    run_dir = tmp_path_factory.mktemp("runs") / "torchrun"
    trained = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "--log-dir", str(run_dir.parent / "torchrun-logs"),  # else a /tmp/torchelastic_*
                              "-m", "multitower", "train", "--data", str(synth_dir), "--run-dir", str(run_dir),
                              "--steps", "8", "--batch-size", "32", "--log-every", "2", "--summary-every", "0",
                              "--progress", "off"], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run_dir / "config.json").read_text())["parallel"]["workers"] == 1
    return run_dir


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


def test_config_differences_only_the_keys_that_differ(runs, resumed_run):
    loaded = load_runs([*runs, resumed_run])
    keys = {key for key, _ in config_differences(loaded)}
    # Not run.run_dir, run.resume (true for the resumed run) or run.progress: how, not what.
    assert keys == {"optim.lr", "data.batch_size"}
    values = dict(config_differences(loaded))["optim.lr"]
    assert values == ["0.1", "0.05", "0.1"]


def test_config_differences_round_floats(tmp_path):
    dirs = []
    for name, lr in (("a", 0.75), ("b", 1.5 * 512 / 1024 + 1e-16), ("c", 0.1 + 0.2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(Config(optim=OptimConfig(lr=lr)).to_json())
        dirs.append(tmp_path / name)
    assert json.loads((dirs[1] / "config.json").read_text())["optim"]["lr"] == 0.7500000000000001
    assert config_differences(load_runs(dirs[:2])) == []  # 0.75 and 0.7500000000000001 do not differ
    assert config_differences(load_runs(dirs)) == [("optim.lr", ["0.75", "0.75", "0.3"])]


def test_workers_are_the_world_size_a_torchrun_run_had(torchrun_run, capsys):
    (run,) = load_runs([torchrun_run])
    assert (run.strategy, run.world_size) == ("sync", 2)  # was "single", 1 (from --workers 1)
    assert "<td>sync</td><td class=num>2</td>" in render([run])
    assert main(["report", str(torchrun_run), "--dry-run"]) == 0
    assert "torchrun: sync, 2 workers, 4 metrics records, not evaluated" in capsys.readouterr().out


def test_wall_time_leaves_out_the_downtime_before_a_resume(resumed_run):
    (run,) = load_runs([resumed_run])
    records = run.metrics
    windows = [records[0]["step"] * records[0]["sec_per_batch"]] + [
        (b["step"] - a["step"]) * b["sec_per_batch"] for a, b in zip(records, records[1:])]
    assert run.resumes() == [5]  # the record of step 12
    clock = records[-1]["wall_time"] - records[0]["wall_time"]
    assert clock > DOWNTIME_S  # what the old axis counted: 100 s and more
    assert run.elapsed_s()[-1] == pytest.approx(sum(windows), abs=0.5)
    assert run.elapsed_s()[-1] < 10 and run.downtime_s() > DOWNTIME_S
    assert "2 segments; " in render([run])


def test_training_clock_rule():
    def record(step, wall, spb=0.5):
        return {"step": step, "wall_time": wall, "sec_per_batch": spb}
    # A segment adds its clock gaps; a gap past its window + 25% + 2 s, or a step that goes
    # back (resumed from the checkpoint of step 10 after logging 12), adds its window only.
    metrics = [record(2, 101.0), record(4, 102.1), record(6, 500.0), record(12, 503.0), record(12, 900.0)]
    elapsed, resumes = training_clock(metrics, log_every=2)
    assert resumes == [2, 4]
    assert elapsed == pytest.approx([1.0, 2.1, 3.1, 6.1, 7.1])


def test_a_stale_evaluation_is_flagged(runs, resumed_run, capsys):
    fresh, resumed = load_runs([runs[0], resumed_run])
    assert not fresh.stale
    assert resumed.stale and resumed.last_eval["step"] == 10 and resumed.trained_step == 20
    page = render([fresh, resumed])
    assert page.count("stale: trained to step 20") == 1 and "Stale (trained on since the last evaluation): resumed" in page
    assert main(["report", str(resumed_run), "--dry-run"]) == 0
    assert "last evaluated at step 10, stale: trained to step 20 since" in capsys.readouterr().out


def test_per_class_bars_carry_each_data_sets_own_class_names(runs, renamed_run, resumed_run):
    import matplotlib.pyplot as plt
    loaded = load_runs([runs[0], renamed_run, resumed_run])
    figure = per_class_figure(loaded)
    labels = [[t.get_text() for t in ax.get_xticklabels()] for ax in figure.axes]
    plt.close(figure)
    synthetic = loaded[0].last_eval["class_names"]
    assert synthetic != RENAMED_CLASSES
    # Two panels: the generated classes (evaluated and resumed), the renamed ones (was: one panel, all
    # bars under the first run's names).
    assert labels == [synthetic, RENAMED_CLASSES]


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
    assert "evaluated: single, 1 worker, 10 metrics records, last evaluated at step 20" in out
    assert "unevaluated: single, 1 worker, 10 metrics records, not evaluated" in out
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


# Appended to a copy of the page (the report itself has no script): what Chromium laid out.
MEASURE_SCRIPT = """<script>window.addEventListener('load', () => {
  const shown = [...document.querySelectorAll('img')].filter(i => i.alt.startsWith('confusion matrix'));
  const out = {viewport: window.innerWidth, page: document.documentElement.scrollWidth,
               confusion: shown.map(i => [i.alt, i.getBoundingClientRect().width, i.naturalWidth])};
  const pre = document.createElement('pre'); pre.id = 'measured'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def measure_layout(html: Path, profile: Path) -> dict:
    """Chromium's layout of `html` at 1200 px wide: page width and each confusion matrix's
    shown width against its PNG's own (MEASURE_SCRIPT, read back with --dump-dom)."""
    probe = html.with_name("measure.html")
    probe.write_text(html.read_text().replace("</body>", MEASURE_SCRIPT + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={profile}", "--window-size=1200,2000", "--virtual-time-budget=5000",
                          "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="measured">([^<]*)</pre>', dom)
    assert found, "chromium ran no script"
    return json.loads(html_module.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(runs, renamed_run, resumed_run, torchrun_run, tmp_path):
    """Two data sets' runs, a resumed one, a torchrun one with world size 2, one never evaluated."""
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), str(renamed_run), str(resumed_run), str(torchrun_run),
                 "--out", str(out)]) == 0
    page = out.read_text()
    assert "<td>sync</td><td class=num>2</td>" in page and "stale: trained to step 20" in page
    assert "2 segments; " in page and "10 classes of animals (animals)" in page
    assert_not_blank(screenshot(out, tmp_path / "shot.png", tmp_path / "chromium-profile"))
    layout = measure_layout(out, tmp_path / "chromium-profile")
    assert layout["page"] <= layout["viewport"], "the page scrolls sideways"
    shown = {alt: width / natural for alt, width, natural in layout["confusion"]}
    assert len(shown) == 3  # evaluated, animals, resumed
    for alt, scale in shown.items():
        # The class names are CONFUSION_LABEL_PT in the PNG; as Chromium shows it (was ~6 px: 7 pt at 0.58x).
        label_px = CONFUSION_LABEL_PT * DPI / 72 * scale
        assert label_px >= 10, f"{alt}: class names {label_px:.1f} px high"


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
