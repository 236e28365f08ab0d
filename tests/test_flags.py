"""The train command line as users from the TensorFlow tutorial, torchrun and Lightning
expect it: the tutorial's own flags, no silent prefixes and a "did you mean", no flag
that changes nothing, config files with flags winning, the resolved configuration."""

import json

import pytest

from helpers import error_lines, multitower
from multitower.cli import main


def resolved(capsys, *argv) -> dict:
    """The configuration `train ... --print-config` resolves."""
    assert main(["train", *argv, "--print-config"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    err = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def test_the_tutorials_flags_have_its_meanings(capsys, synth_dir, tmp_path):
    # --batch_size is per tower: 4 towers of 32 are a global batch of 128.
    config = resolved(capsys, "--data_dir", str(synth_dir), "--train_dir", str(tmp_path / "tf"), "--max_steps", "500",
                      "--num_gpus", "4", "--batch_size", "32")
    assert (config["data"]["dir"], config["run"]["run_dir"], config["run"]["steps"]) == \
        (str(synth_dir.resolve()), str(tmp_path / "tf"), 500)
    assert (config["parallel"]["workers"], config["data"]["batch_size"]) == (4, 128)
    assert "--batch-size (global)" in one_line_error(capsys, ["train", "--data", str(synth_dir), "--batch_size", "32",
                                                             "--batch-size", "64"])


def test_the_tutorials_eval_flags(synth_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(synth_dir), "--run-dir", str(run_dir), "--steps", "2", "--batch-size", "16",
                 "--progress", "off"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint_dir", str(run_dir), "--run_once"]) == 0
    assert "step 2: precision @ 1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint_dir", str(run_dir), "--eval_interval_secs", "0.01", "--max-evals", "1"]) == 0


def test_log_device_placement_prints_each_ranks(synth_dir, tmp_path):
    result = multitower("train", "--data", synth_dir, "--run-dir", tmp_path / "run", "--steps", 2, "--batch_size", 8,
                        "--num_gpus", 2, "--summary-every", 0, "--log_device_placement")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert sorted(line.split(" (")[0] for line in lines) == ["rank 0", "rank 1"], result.stdout
    assert all("sync on cpu, process group gloo" in line and "parameter tensors on cpu" in line for line in lines)


@pytest.mark.parametrize("typed, meant", [
    ("--batch", "--batch-size"), ("--step", "--steps"), ("--stepz", "--steps"), ("--sync_every", "--sync-every")])
def test_no_prefix_stands_for_a_flag_and_unknown_ones_get_a_suggestion(capsys, synth_dir, typed, meant):
    line = one_line_error(capsys, ["train", "--data", str(synth_dir), typed, "10"])
    assert line.startswith(f"multitower: error: train: unrecognized arguments: {typed} 10; did you mean ") and \
        meant in line, line


@pytest.mark.parametrize("flags, message", [
    (["--grad-compression", "bf16"], "--strategy single (auto, for 1 worker) takes no --grad-compression: it is "
                                     "for --strategy sync"),
    (["--accumulate", "4", "--strategy", "downpour", "--workers", "2"], "--strategy downpour takes no --accumulate"),
    (["--accumulate", "4", "--strategy", "hogwild", "--workers", "2"], "--strategy hogwild takes no --accumulate"),
    (["--accumulate", "4", "--strategy", "pipeline", "--workers", "2"], "--strategy pipeline takes no --accumulate"),
    (["--stages", "2", "--workers", "2"], "--strategy sync (auto, for 2 workers) takes no --stages: it is for "
                                          "--strategy pipeline"),
    (["--microbatches", "2", "--strategy", "local-sgd", "--workers", "2"], "takes no --microbatches"),
    (["--ps", "2", "--workers", "2"], "takes no --ps: it is for --strategy downpour"),
    (["--sync-every", "2", "--strategy", "sync", "--workers", "2"], "takes no --sync-every: it is for --strategy local-sgd"),
    (["--strategy", "single", "--workers", "2"], "--strategy single trains one process, not --workers 2"),
    (["--workers", "5000"], "--workers must be at most 1024"),
    (["--max-restarts", "1000"], "--max-restarts must be between 0 and 100"),
])
def test_a_flag_that_would_change_nothing_is_refused(capsys, synth_dir, tmp_path, flags, message):
    line = one_line_error(capsys, ["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), *flags,
                                   "--dry-run"])
    assert message in line, line
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_flags_winning(capsys, synth_dir, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\ndir = "{synth_dir}"\nbatch_size = 64\n[optim]\nlr = 0.05\n'
                    f'[parallel]\nstrategy = "local-sgd"\nworkers = 2\n[parallel.options]\nsync_every = 8\n'
                    f'[run]\nsteps = 300\n')
    config = resolved(capsys, "--config", str(toml), "--lr", "0.02")
    assert (config["data"]["batch_size"], config["optim"]["lr"], config["run"]["steps"]) == (64, 0.02, 300)
    assert config["parallel"]["strategy"] == "local-sgd" and config["parallel"]["options"] == {"sync_every": 8}
    # A run's own config.json is a config file too: its settings, another run directory.
    run_dir = tmp_path / "first"
    assert main(["train", "--config", str(toml), "--run-dir", str(run_dir), "--steps", "2", "--strategy", "single",
                 "--workers", "1", "--progress", "off"]) == 2  # local-sgd's sync_every is not single's
    assert "takes no --sync-every" in capsys.readouterr().err
    assert main(["train", "--data", str(synth_dir), "--run-dir", str(run_dir), "--steps", "2", "--lr", "0.03",
                 "--batch-size", "16", "--progress", "off"]) == 0
    capsys.readouterr()
    again = resolved(capsys, "--config", str(run_dir / "config.json"), "--run-dir", str(tmp_path / "second"))
    assert (again["optim"]["lr"], again["data"]["batch_size"], again["run"]["run_dir"]) == \
        (0.03, 16, str(tmp_path / "second"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 0.1\n")
    assert "unknown setting optim.learning_rate" in one_line_error(capsys, ["train", "--config", str(bad)])


def test_the_training_bar_shows_the_loss(synth_dir, tmp_path):
    result = multitower("train", "--data", synth_dir, "--run-dir", tmp_path / "run", "--steps", 20, "--batch-size", 16,
                        "--log-every", 10, "--summary-every", 0, "--progress", "on")
    assert result.returncode == 0, result.stderr
    assert "loss=" in result.stderr and "20/20" in result.stderr, result.stderr[-500:]
