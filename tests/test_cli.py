"""The command line: every user mistake is one line on stderr, exit 2, no traceback."""

import subprocess
import sys

import pytest

from multitower.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/nonexistent/data"], "/nonexistent/data"),
    (["train"], "--data is required"),
    (["train", "--data", "DATA", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["train", "--data", "DATA", "--workers", "3"], "must divide evenly"),
    (["train", "--data", "DATA", "--model", "resnet-9000", "--dry-run"], "resnet-9000"),
    (["train", "--data", "DATA", "--strategy", "telepathy"], "unknown --strategy"),
    (["train", "--data", "DATA", "--lr", "-1"], "--lr must be positive"),
    (["train", "--data", "DATA", "--strategy", "hogwild", "--workers", "2", "--channels-last", "--dry-run"],
     "--strategy hogwild cannot take --channels-last"),
    (["train", "--data", "DATA", "--strategy", "pipeline", "--workers", "2", "--precision", "bf16", "--dry-run"],
     "--strategy pipeline cannot take --precision bf16"),
    (["eval", "/nonexistent/run", "--once"], "not a multitower run directory"),
    (["data", "synth", "--out", "EXISTING"], "EXISTING"),
    (["data", "import", "/nonexistent/images", "--out", "NEW"], "/nonexistent/images"),
])
def test_user_errors_are_one_line(capsys, synth_dir, tmp_path, argv, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    replace = {"DATA": str(synth_dir), "EXISTING": str(existing), "NEW": str(tmp_path / "new")}
    argv = [replace.get(a, a) for a in argv]
    message = replace.get(message, message)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("multitower: error:"), err
    assert message in lines[0]
    assert (existing / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "new").exists()


def test_dry_run_touches_nothing(capsys, synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--data", str(synth_dir), "--run-dir", str(run_dir), "--dry-run")
    assert code == 0 and "GENERATED" in out and "1,068,298 parameters" in out
    assert not run_dir.exists()


def test_train_then_eval_through_the_entry_point(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    env_python = [sys.executable, "-m", "multitower"]
    trained = subprocess.run(env_python + ["train", "--data", str(synth_dir), "--run-dir", str(run_dir),
                                           "--steps", "20", "--batch-size", "32", "--summary-every", "10"],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert "GENERATED" in trained.stdout and "step 20, loss =" in trained.stdout
    evaluated = subprocess.run(env_python + ["eval", str(run_dir), "--once"],
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "precision @ 1" in evaluated.stdout
    again = subprocess.run(env_python + ["train", "--data", str(synth_dir), "--run-dir", str(run_dir)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds a run" in again.stderr


@pytest.mark.parametrize("argv", [["devices", "--json"], ["plan", "--dry-run"]])
def test_a_closed_pipe_ends_quietly(argv):
    """`multitower devices --json | head`: the reader is gone before the output is written."""
    child = subprocess.Popen([sys.executable, "-m", "multitower", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # long before the child has imported torch and printed
    err = child.stderr.read()
    assert child.wait(timeout=120) == 1
    assert err == "", err  # was a BrokenPipeError traceback


def test_version_names_the_package_and_torch(capsys):
    import torch
    from multitower import __version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"multitower {__version__} (torch {torch.__version__})"


def test_top_level_help_describes_the_tool(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Train deep networks on many CPU cores, GPUs and machines" in out
    assert "argparse" not in out and "multitower demo" in out


def test_train_help_examples_are_valid_command_lines(capsys):
    import shlex
    from multitower.cli import TRAIN_EXAMPLES, build_parser
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert out.count("\n  multitower ") == len(TRAIN_EXAMPLES) >= 4
    for command, _ in TRAIN_EXAMPLES:
        assert f"  {command}\n" in out
        words = shlex.split(command)
        assert words[0] == "multitower"
        build_parser(words[1:]).parse_args(words[1:])  # an unknown flag or bad value exits here
