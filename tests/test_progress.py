"""Progress of the commands besides train: a bar on a terminal, a few whole lines in a log
(never a log full of carriage returns), nothing when asked; and the demo's last words."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from multitower.cli import main
from multitower.config import Config, DataConfig, RunConfig
from multitower.progress import PLAIN_LINES, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def count_to(mode, file, total=1000, step=10):
    with progress(mode, total=total, desc="count", unit="img", file=file) as bar:
        for _ in range(0, total, step):
            bar.update(step)
    return file.getvalue()


def test_a_bar_on_a_terminal_plain_lines_elsewhere_nothing_when_off():
    assert "\r" in count_to("auto", Terminal())              # tqdm redraws in place
    log = count_to("auto", io.StringIO())
    assert "\r" not in log and 1 <= len(log.splitlines()) <= PLAIN_LINES
    assert log.splitlines()[-1].startswith("count: 100% (1,000 of 1,000 img), ")
    assert "\r" in count_to("on", io.StringIO())             # asked for: the bar even in a file
    assert count_to("off", Terminal()) == ""
    assert count_to(False, Terminal()) == "" and "\r" in count_to(True, io.StringIO())  # library bools


def test_plain_lines_without_a_total_say_once_at_the_end():
    log = io.StringIO()
    with progress("auto", total=None, desc="extract", unit="file", file=log) as bar:
        for _ in range(7):
            bar.update(1)
    assert log.getvalue().startswith("extract: done (7 file), ")


def image_folder(root, classes=("ant", "bee"), per_class=300):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for number in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{number}.png")
    return root


def test_data_import_writes_whole_lines_to_a_log(tmp_path, capsys):
    src = image_folder(tmp_path / "src")
    assert main(["data", "import", str(src), "--out", str(tmp_path / "out"), "--val", "10", "--workers", "1"]) == 0
    err = capsys.readouterr().err  # not a terminal
    assert "\r" not in err  # was tqdm's bar, redrawn with \r, in the file
    lines = err.splitlines()
    assert 1 <= len(lines) <= PLAIN_LINES and lines[-1].startswith("decode: 100% (600 of 600 img), ")


@pytest.fixture(scope="module")
def short_run(synth_dir, tmp_path_factory):
    from multitower.train.loop import train
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    train(Config(data=DataConfig(dir=str(synth_dir), batch_size=32),
                 run=RunConfig(run_dir=str(run_dir), steps=2, summary_every=0, progress="off")).validate())
    return run_dir


@pytest.mark.parametrize("flags, expect", [([], "lines"), (["--progress", "on"], "bar"), (["--progress", "off"], "")])
def test_eval_shows_its_progress(short_run, capsys, flags, expect):
    assert main(["eval", str(short_run), "--once", "--batch-size", "100", *flags]) == 0
    captured = capsys.readouterr()
    assert "precision @ 1" in captured.out
    if expect == "lines":  # was: nothing at all until the table, 71 s later
        lines = captured.err.splitlines()
        assert "\r" not in captured.err and 1 <= len(lines) <= PLAIN_LINES
        assert lines[-1].startswith("eval step 2 (val): 100% (512 of 512 img), ")
    elif expect == "bar":
        assert "\r" in captured.err and "512/512" in captured.err
    else:
        assert captured.err == ""


def test_demo_ends_by_saying_what_to_look_at_next(synth_dir, tmp_path, capsys):
    data_root = tmp_path / "data"
    shutil.copytree(synth_dir, data_root / "synthetic")  # the demo's own generated set, made already
    run_dir = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--data-root", str(data_root), "--run-dir", str(run_dir),
                 "--cifar-images", str(tmp_path / "no-cifar")]) == 0
    out = capsys.readouterr().out
    tail = out[out.index("next:"):].splitlines()
    assert f"  tensorboard --logdir {run_dir / 'events'}" in tail
    assert f"  multitower report {run_dir} --out report.html" in tail
    suggested = f"  multitower train --run-dir {run_dir} --resume --steps 4"
    assert suggested in tail
    assert main([*suggested.split()[1:], "--progress", "off"]) == 0  # and it does train on
    assert (run_dir / "events").is_dir()  # where the tensorboard line points
