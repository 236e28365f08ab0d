"""The interconnect benchmark's parts (bench/interconnect.py): how a cell is predicted from
what was measured (the link fit, the cores the emulated nodes share, which transport each
strategy is predicted on), and, where namespaces can be made, the two calibrations across
an emulated link. The benchmark itself is run by hand (docs/interconnect.md)."""

import pytest

from multitower.bench import interconnect
from multitower.bench.cost_model import Link
from multitower.bench.interconnect import LATENCY_BYTES, Setup, cores_shared_by, fit_link, predict
from multitower.plan import model_bytes, pipeline_cut
from helpers import benchmark_script
from test_cluster import namespaces, ours_left  # noqa: F401 - a fixture


def test_the_link_fit_takes_alpha_from_the_small_message_and_beta_from_the_large():
    alpha, beta = 0.5e-3, 1e8
    times = {LATENCY_BYTES: 2 * alpha, **{m: 2 * alpha + m / beta for m in interconnect.BANDWIDTH_BYTES}}
    assert fit_link(times) == pytest.approx((alpha, beta))


def test_a_cells_log_windows_last_about_four_seconds_within_their_step_bounds():
    """Fast steps fill a window to its most steps, slow ones keep the fewest; local SGD's
    windows hold whole averaging periods; a warm-up window comes first."""
    script = benchmark_script("interconnect")
    fewest, most = script.WINDOW_STEPS
    assert script.cell_steps(0.06, 3, quick=False) == (4 * most, most)
    assert script.cell_steps(0.3, 3, quick=False) == (4 * 13, 13)
    assert script.cell_steps(0.3, 3, quick=False, period=4) == (4 * 12, 12)
    assert script.cell_steps(3.0, 3, quick=False) == (4 * fewest, fewest)
    assert script.cell_steps(0.06, 2, quick=True, period=4) == (3 * 4, 4)


def test_four_nodes_on_two_cores_share_them_pairwise(monkeypatch):
    monkeypatch.setattr(interconnect.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cores_shared_by(Setup("sync", 2)) == 1
    assert cores_shared_by(Setup("sync", 4)) == 2
    assert cores_shared_by(Setup("downpour", 4)) == 2  # the server's node shares too, but it is no worker
    monkeypatch.setattr(interconnect.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cores_shared_by(Setup("sync", 4)) == 1


def test_each_strategy_is_predicted_on_its_own_transport(monkeypatch):
    """Downpour exchanges over rpc, the others over gloo: a slower rpc link slows downpour's
    prediction alone; sync-bf16 sends half of sync's bytes."""
    monkeypatch.setattr(interconnect.os, "sched_getaffinity", lambda pid: {0, 1})
    param_bytes, activation_bytes = model_bytes("cifar10-tf", 1)
    cut = pipeline_cut("cifar10-tf", 1, 2)
    gloo, rpc = Link("gloo", 1e8, 1e-3, 1e-9), Link("rpc", 5e7, 1e-3, 1e-9)
    fast = {s: predict(Setup(s, 2), 1e-3, gloo, param_bytes, activation_bytes, cut, gloo) for s in interconnect.STRATEGIES}
    slow = {s: predict(Setup(s, 2), 1e-3, gloo, param_bytes, activation_bytes, cut, rpc) for s in interconnect.STRATEGIES}
    assert slow["downpour"].step_s > fast["downpour"].step_s
    assert all(slow[s].step_s == fast[s].step_s for s in interconnect.STRATEGIES if s != "downpour")
    assert fast["sync-bf16"].comm_s < fast["sync"].comm_s
    # sync-bf16 over the link calibrated with the hook's casts and bf16 sums, where given:
    # 5 ns of CPU per byte, all of it on the cores, slows it alone.
    costly = Link("bf16 hook", 1e8, 1e-3, 5e-9)
    hooked = {s: predict(Setup(s, 2), 1e-3, gloo, param_bytes, activation_bytes, cut, gloo, bf16_link=costly)
              for s in interconnect.STRATEGIES}
    assert hooked["sync-bf16"].step_s > fast["sync-bf16"].step_s
    assert all(hooked[s].step_s == fast[s].step_s for s in interconnect.STRATEGIES if s != "sync-bf16")
    # 2 x (1 ms + 4.27 MB / 50 MB/s), the request and its reply, nothing hidden (4.27 MB x 1 ns
    # of CPU is less), each of the two workers' waiting behind the other's on the server's link
    # for the other's share of its cycle.
    compute_s, wire_s = 64 * 1e-3, param_bytes / 5e7
    alone_s = compute_s + 2 * (1e-3 + wire_s)
    assert slow["downpour"].step_s == pytest.approx(alone_s + 2 * wire_s * wire_s / alone_s)


@pytest.mark.slow
def test_both_calibrations_across_an_emulated_link(namespaces):  # noqa: F811 - the fixture
    """gloo's all-reduce (plain, and as the bf16 hook makes it) and downpour's rpc exchange
    between two emulated nodes, unshaped: each gives a latency, a bandwidth and some CPU per byte, no more CPU than wall time."""
    for calibrate in (interconnect.calibrate_link, interconnect.calibrate_rpc,
                      lambda rate, samples: interconnect.calibrate_link(rate, samples, hook="bf16")):
        result = calibrate(None, samples=2)
        assert result["alpha_s"] > 0 and result["beta_Bps"] > 1e7
        assert 0 < result["cpu_s_per_byte"] < 1e-7
        largest = result["samples"][-1]
        assert 0 < largest["cpu_median_s"] <= 2 * largest["median_s"]
    assert ours_left() == []


def test_the_benchmark_runs_a_named_part_of_its_matrix_and_refuses_other_names():
    """--strategies / --links / --nodes: the names given, in the matrix's order; a name
    outside it stops the benchmark before anything is made (exit 2, the flag named)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "interconnect.py"
    bench = benchmark_script("interconnect")
    LINKS, choices = bench.LINKS, bench.choices
    assert choices("sync-bf16, sync", interconnect.STRATEGIES, "--strategies") == ("sync", "sync-bf16")
    assert choices("50mbit,unshaped", LINKS, "--links") == ("unshaped", "50mbit")
    done = subprocess.run([sys.executable, str(script), "--strategies", "sync,hogwild"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "--strategies takes a comma-separated list of sync, sync-bf16, local-sgd, downpour, pipeline; got " \
           "'sync,hogwild'" in done.stderr


def test_a_stored_run_is_predicted_again_from_its_own_measurements(tmp_path, capsys, monkeypatch):
    """--repredict: each cell from its stored calibrations and compute with the tree's model
    (here what the run stored, so the same figures), sync-bf16 also over the float32 link,
    and the winners it picks against the measured ones;
    refused in one line where this machine has another number of cores."""
    import json
    from multitower.bench.calibrate import calibrated_link
    monkeypatch.setattr(interconnect.os, "sched_getaffinity", lambda pid: {0, 1})
    repredict = benchmark_script("interconnect").repredict
    param_bytes, activation_bytes = model_bytes("cifar10-tf", 1)
    cut = pipeline_cut("cifar10-tf", 1, 2)
    fp32 = {"alpha_s": 1e-3, "beta_Bps": 1e8, "cpu_s_per_byte": 1e-9}
    bf16 = {"alpha_s": 1e-3, "beta_Bps": 8e7, "cpu_s_per_byte": 3e-9}
    cells = []
    for strategy, measured in (("sync", 1000.0), ("sync-bf16", 1100.0)):
        cell = {"strategy": strategy, "nodes": 2, "link": "1gbit", "compute_s_per_example": 1e-3,
                "backward_share": 0.6, "measured": {"images_per_sec": measured}}
        predicted = predict(Setup(strategy, 2), 1e-3, calibrated_link("l", fp32), param_bytes, activation_bytes, cut,
                            calibrated_link("l", fp32), 0.6, calibrated_link("l", bf16))
        cells.append({**cell, "predicted": {"images_per_sec": predicted.images_per_sec}})
    old = predict(Setup("sync-bf16", 2), 1e-3, calibrated_link("l", fp32), param_bytes, activation_bytes, cut,
                  calibrated_link("l", fp32), 0.6).images_per_sec
    run = {"environment": {"cores": 2}, "param_bytes": param_bytes, "activation_bytes_per_example": activation_bytes,
           "pipeline_cut": cut, "calibrations": {"1gbit": fp32}, "rpc_calibrations": {"1gbit": fp32},
           "bf16_calibrations": {"1gbit": bf16}, "cells": cells}
    path = tmp_path / "interconnect.json"
    path.write_text(json.dumps(run))
    repredict(path)
    rows = capsys.readouterr().out.splitlines()
    for cell, row in zip(cells, rows[1:3]):
        assert row.split()[4] == row.split()[5] == f"{cell['predicted']['images_per_sec']:.1f}", row
    assert f"{old:.1f} (" in rows[2] and "(" not in rows[1]
    within = sum(abs(c["predicted"]["images_per_sec"] / c["measured"]["images_per_sec"] - 1) <= 0.15 for c in cells)
    summary = next(i for i, row in enumerate(rows) if row.startswith("predicted now"))
    predicted_winner = max(cells, key=lambda c: c["predicted"]["images_per_sec"])["strategy"]
    assert predicted_winner == "sync"  # the fixture's bf16 link costs 3x the CPU per byte: the line below shows
    agree = predicted_winner == "sync-bf16"  # measured 1100 against sync's 1000
    assert rows[summary] == (f"predicted now: within 15% in {within} of 2 cells; the measured winner predicted in "
                             f"{int(agree)} of 1 settings")
    assert rows[summary + 1:] == ([] if agree else
                                  [f"  2 nodes, 1gbit: measured winner sync-bf16, predicted {predicted_winner}"])
    path.write_text(json.dumps({**run, "environment": {"cores": 8}}))
    with pytest.raises(SystemExit, match="measured on 8 cores, this process has 2"):
        repredict(path)


def test_a_stored_downpour_cell_is_predicted_again_with_and_without_its_servers_answers(tmp_path, capsys,
                                                                                          monkeypatch):
    """--repredict on a downpour cell whose rpc calibration timed the answering side: the row
    also gives the prediction without the server's answers, and the link line their figure."""
    import json
    from dataclasses import replace
    from multitower.bench.calibrate import calibrated_link
    monkeypatch.setattr(interconnect.os, "sched_getaffinity", lambda pid: {0, 1})
    repredict = benchmark_script("interconnect").repredict
    param_bytes, activation_bytes = model_bytes("cifar10-tf", 1)
    cut = pipeline_cut("cifar10-tf", 1, 2)
    gloo = {"alpha_s": 1e-3, "beta_Bps": 1e8, "cpu_s_per_byte": 1e-9}
    rpc = {**gloo, "samples": [{"bytes": 2 ** 22, "median_s": 0.1, "server_cpu_s": 2 ** 22 * 5e-9}]}
    cell = {"strategy": "downpour", "nodes": 2, "link": "1gbit", "compute_s_per_example": 1e-3,
            "backward_share": 0.6, "measured": {"images_per_sec": 300.0}, "predicted": {"images_per_sec": 1.0}}
    answered = calibrated_link("l", rpc)
    expected = [predict(Setup("downpour", 2), 1e-3, calibrated_link("l", gloo), param_bytes, activation_bytes, cut,
                        link, 0.6).images_per_sec for link in (answered, replace(answered, answer_cpu_s_per_byte=0.0))]
    assert expected[0] < expected[1]  # the server on worker 0's core slows it
    path = tmp_path / "interconnect.json"
    path.write_text(json.dumps({"environment": {"cores": 2}, "param_bytes": param_bytes,
                                "activation_bytes_per_example": activation_bytes, "pipeline_cut": cut,
                                "calibrations": {"1gbit": gloo}, "rpc_calibrations": {"1gbit": rpc},
                                "bf16_calibrations": {}, "cells": [cell]}))
    repredict(path)
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[5] == f"{expected[0]:.1f}" and f"{expected[1]:.1f} (" in rows[1], rows[1]
    assert "5 ns CPU/byte answering" in rows[2], rows[2]


def test_a_cell_is_the_median_of_its_repetitions_with_their_spread():
    """--reps: a cell's measured rates and the compute it is predicted from are the medians
    of its repetitions (each kept), its spread max / min - 1 of their images/sec, and the
    table counts the cells whose spread exceeds the planner's allowed error."""
    bench = benchmark_script("interconnect")

    def rep(i, rate, compute, comm):
        return {"strategy": "sync", "nodes": 2, "cluster_nodes": 2, "link": "1gbit", "rate_bps": 10 ** 9, "rep": i,
                "steps": 40, "log_every": 10, "compute_s_per_example": compute, "backward_share": 0.6 + i / 100,
                "measured": {"images_per_sec": rate, "comm_fraction": comm, "bytes_per_step": 4e6 + i,
                             "wall_s": 20.0}}
    runs = [rep(0, 1200.0, 7e-4, 0.5), rep(1, 1000.0, 9e-4, 0.4), rep(2, 1500.0, 8e-4, 0.6)]
    cell = bench.median_cell(runs)
    assert cell["measured"]["images_per_sec"] == 1200.0
    assert cell["measured"]["comm_fraction"] == 0.5
    assert cell["measured"]["bytes_per_step"] == 4e6 + 1
    assert cell["measured"]["wall_s"] == 60.0
    assert cell["compute_s_per_example"] == 8e-4 and cell["backward_share"] == 0.61
    assert cell["spread"] == 0.5 and cell["repetitions"] == runs
    assert (cell["strategy"], cell["nodes"], cell["link"]) == ("sync", 2, "1gbit")
    quiet = {**cell, "spread": 0.1}
    for c, error in ((cell, 0.2), (quiet, 0.05)):
        c.update({"error": error, "predicted": {"images_per_sec": 1200.0 * (1 + error)},
                  "predicted_comm_fraction": 0.3})
    text = bench.table({"cells": [cell, quiet], "winners": [], "reps": 3})
    assert "median of 3 interleaved repetitions" in text
    assert "planner within 15% in 1 of 2 cells; 1 cells spread more than 15% between repetitions" in text


def test_a_failed_cell_is_kept_and_run_once_more_and_a_second_failure_ends_the_run(tmp_path):
    """A cell's failing job: its whole output is written beside the JSON and listed in the
    result's failures, the cell runs once more in a new run dir; failing again ends it."""
    import pytest
    from multitower.bench.interconnect import CellFailed
    bench = benchmark_script("interconnect")
    dirs = []

    def flaky(run_dir):
        dirs.append(run_dir.name)
        if len(dirs) == 1:
            raise CellFailed("sync on 2 nodes over 1gbit failed: RendezvousConnectionError", "the job's output\n")
        return "measured"
    result = {"failures": []}
    assert bench.cell_run(result, str(tmp_path), "sync-2-1gbit-0", flaky, tmp_path / "run") == "measured"
    assert dirs == ["run", "run-again"]
    [failure] = result["failures"]
    assert failure["cell"] == "sync-2-1gbit-0" and failure["attempt"] == 0
    assert "RendezvousConnectionError" in failure["line"]
    assert (tmp_path / "failed-sync-2-1gbit-0-0.log").read_text() == "the job's output\n"

    def broken(run_dir):
        raise CellFailed("pipeline on 2 nodes over 50mbit failed: boom", "out")
    with pytest.raises(CellFailed, match="boom"):
        bench.cell_run(result, str(tmp_path), "pipeline-2-50mbit-1", broken, tmp_path / "p")
    assert [f["attempt"] for f in result["failures"]] == [0, 0, 1]
