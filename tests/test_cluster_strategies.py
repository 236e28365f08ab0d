"""Every strategy across emulated nodes (`multitower cluster`), checked as on one node: the
deterministic ones end bitwise equal to the same job on one node (sync with each gradient
compression, local SGD, a pipeline with one stage per node, stages x replicas); downpour runs
its server on a node of its own; every checkpoint is written once, by global rank 0; `eval`
and `--resume` work on the result; no process listens in the host's network namespace;
hogwild is refused in one line. Skipped, with the reason, where namespaces cannot be made."""

import json
import re
import time

import pytest
import torch

from cluster_job import ClusterJob, environ, worker_pids
from helpers import error_lines, metrics, multitower, start_multitower
from multitower.train.checkpoint import CheckpointDir
from test_cluster import _listening, _process_tree, namespaces, ours_left  # noqa: F401 - a fixture

STEPS = 12  # past PowerSGD's 10 exact warm-up steps
COMMON = ["--batch-size", "32", "--summary-every", "0", "--log-every", "4", "--checkpoint-every", "4"]
# name: (cluster flags, train flags); each node runs one process.
DETERMINISTIC = {
    "sync-bf16": (["--nodes", "2"], ["--workers", "2", "--grad-compression", "bf16"]),
    "sync-powersgd": (["--nodes", "2"], ["--workers", "2", "--grad-compression", "powersgd"]),
    "local-sgd": (["--nodes", "2"], ["--strategy", "local-sgd", "--workers", "2", "--sync-every", "2"]),
    "pipeline-stage-per-node": (["--nodes", "2"], ["--strategy", "pipeline", "--stages", "2", "--workers", "2"]),
    "pipeline-stages-x-replicas": (["--nodes", "4"], ["--strategy", "pipeline", "--stages", "2", "--workers", "4"]),
}


def train_args(synth_dir, run_dir, flags, steps=STEPS, *extra):
    return ["train", "--data", synth_dir, "--run-dir", run_dir, "--steps", steps, *COMMON, *flags, *extra]


def run_watching_sockets(job: ClusterJob, host_netns: str) -> tuple[int, int, list[dict]]:
    """Wait for the job, meanwhile the most listening sockets seen at once in the host's
    namespace and in the nodes', and what each training process's environment said."""
    in_host = in_nodes = 0
    seen: dict[int, dict] = {}
    while job.process.poll() is None:
        sockets = [_listening(pid) for pid in _process_tree(job.process.pid)]
        in_host = max(in_host, sum(n for netns, n in sockets if netns == host_netns))
        in_nodes = max(in_nodes, sum(n for netns, n in sockets if netns not in (None, host_netns)))
        try:
            for node in range(8):
                for pid in worker_pids(job.namespace(node)):
                    seen.setdefault(pid, {"node": node, **environ(pid)})
        except (OSError, AssertionError):
            pass
        time.sleep(0.2)
    job.wait()
    return in_host, in_nodes, list(seen.values())


def check_written_once(run_dir, steps: list[int]) -> None:
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
    assert [entry["step"] for entry in index["checkpoints"]] == steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["index.json", *(f"step-{step:08d}.pt" for step in steps)]
    assert [r["step"] for r in metrics(run_dir)] == steps  # one record per log line: rank 0 alone writes


def check_eval_and_resume(cluster_flags, synth_dir, run_dir, flags) -> None:
    evaluated = multitower("eval", run_dir, "--once", "--progress", "off")
    assert evaluated.returncode == 0 and f"step {STEPS}: precision @ 1 = " in evaluated.stdout, evaluated.stderr
    resumed = multitower("cluster", *cluster_flags, "--", *train_args(synth_dir, run_dir, flags, STEPS + 4, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"[node 0] resumed {run_dir} at step {STEPS}" in resumed.stdout, resumed.stdout[-2000:]
    assert CheckpointDir(run_dir / "checkpoints").load()["step"] == STEPS + 4


@pytest.mark.slow
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_a_deterministic_strategy_across_nodes_equals_it_on_one_node(namespaces, synth_dir, tmp_path, name):
    import os
    cluster_flags, flags = DETERMINISTIC[name]
    host_netns = os.readlink("/proc/self/ns/net")
    started = time.monotonic()
    job = ClusterJob(*cluster_flags, "--link", "200mbit", "--", *train_args(synth_dir, tmp_path / "nodes", flags))
    control = start_multitower(*train_args(synth_dir, tmp_path / "one", flags))  # the same job on one node
    try:
        in_host, in_nodes, _ = run_watching_sockets(job, host_netns)
    finally:
        job.stop()
    print(f"{name}: {time.monotonic() - started:.1f} s on {cluster_flags[1]} nodes (with the control alongside)")
    assert job.process.returncode == 0, "\n".join(job.err) + job.out[-3000:]
    assert control.wait(timeout=300) == 0, control.stderr.read()

    nodes, one = (CheckpointDir(tmp_path / run / "checkpoints").load() for run in ("nodes", "one"))
    assert nodes["step"] == one["step"] == STEPS
    for part in ("model", "ema"):
        unequal = [key for key in one[part] if not torch.equal(nodes[part][key], one[part][key])]
        assert not unequal, f"{part} tensors differ from the one-node run: {unequal}"
    if name.startswith("sync"):  # every replica's digest, gathered at the checkpoint
        assert len(nodes["replica_digests"]) == 2 and len(set(nodes["replica_digests"])) == 1
    assert in_host == 0, "a process of the cluster job listened in the host's network namespace"
    assert in_nodes >= 2, f"the job's listening sockets were not seen in the nodes ({in_nodes})"
    assert "[node 0] done: step 12" in job.out  # global rank 0 runs on node 0
    check_written_once(tmp_path / "nodes", [4, 8, 12])
    check_eval_and_resume(cluster_flags, synth_dir, tmp_path / "nodes", flags)
    assert not ours_left()


@pytest.mark.slow
def test_downpour_runs_its_server_on_a_node_of_its_own(namespaces, synth_dir, tmp_path):
    """--ps-node: 2 worker nodes and a third running the one server, global rank W = 2;
    TensorPipe listens inside the nodes only."""
    import os
    flags = ["--strategy", "downpour", "--workers", "2", "--ps", "1"]
    cluster_flags = ["--nodes", "3", "--ps-node"]
    job = ClusterJob(*cluster_flags, "--link", "200mbit", "--", *train_args(synth_dir, tmp_path / "run", flags))
    try:
        in_host, in_nodes, processes = run_watching_sockets(job, os.readlink("/proc/self/ns/net"))
    finally:
        job.stop()
    assert job.process.returncode == 0, "\n".join(job.err) + job.out[-3000:]
    ranks = sorted((p["node"], p.get("RANK"), p.get("GROUP_RANK")) for p in processes)
    assert ranks == [(0, "0", "0"), (1, "1", "1"), (2, "2", "2")], ranks  # rank 2 = parameter server 0
    assert in_host == 0 and in_nodes >= 3, (in_host, in_nodes)
    check_written_once(tmp_path / "run", [4, 8, 12])
    check_eval_and_resume(cluster_flags, synth_dir, tmp_path / "run", flags)
    assert not ours_left()


def test_hogwild_is_refused_across_nodes_in_one_line(synth_dir, tmp_path):
    result = multitower("cluster", "--nodes", "2", "--dry-run", "--", *train_args(synth_dir, tmp_path / "run", [
        "--strategy", "hogwild", "--workers", "2"]))
    assert result.returncode == 2 and error_lines(result.stderr) == [
        "multitower: error: --strategy hogwild shares one machine's memory between its workers and cannot span "
        "--nodes 2; use sync or local-sgd across nodes, or --nodes 1"], result.stderr


@pytest.mark.parametrize("cluster_flags, flags, says", [
    (["--nodes", "2", "--ps-node"], ["--workers", "2"], "--ps-node puts downpour's parameter servers on a node"),
    (["--nodes", "3", "--ps-node"], ["--strategy", "downpour", "--workers", "3", "--ps", "1", "--batch-size", "30"],
     "--ps-node leaves 2 of the --nodes 3 to the workers: give --workers a multiple of 2, got 3"),
    (["--nodes", "2", "--min-nodes", "1"], ["--workers", "2"], "--min-nodes 1 needs --max-restarts 1 or more"),
    (["--nodes", "2", "--min-nodes", "3"], ["--workers", "2"], "--min-nodes must be from 1 to --nodes 2, got 3"),
    (["--nodes", "3", "--min-nodes", "2"], ["--workers", "3", "--batch-size", "27", "--max-restarts", "1"],
     "--batch-size 27 cannot be divided among the 2 workers of 2 nodes"),
    (["--nodes", "3", "--ps-node", "--min-nodes", "2"],
     ["--strategy", "downpour", "--workers", "2", "--ps", "1", "--max-restarts", "1"],
     "--strategy downpour needs all of its processes"),
])
def test_node_layouts_that_cannot_work_are_refused_in_one_line(synth_dir, tmp_path, cluster_flags, flags, says):
    result = multitower("cluster", *cluster_flags, "--dry-run", "--", *train_args(synth_dir, tmp_path / "run", flags))
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and says in lines[0], result.stderr


def test_dry_run_puts_downpours_servers_on_the_last_node(synth_dir, tmp_path):
    result = multitower("cluster", "--nodes", "3", "--ps-node", "--min-nodes", "3", "--dry-run", "--",
                        *train_args(synth_dir, tmp_path / "run", ["--strategy", "downpour", "--workers", "4",
                                                                   "--ps", "1", "--batch-size", "32"]))
    assert result.returncode == 0, result.stderr
    nodes = [line for line in result.stdout.splitlines() if re.match(r"node \d \(198", line)]
    assert [re.search(r"--nproc-per-node (\d+)", n).group(1) for n in nodes] == ["2", "2", "1"]
    assert all("-m multitower.cluster.agent --nnodes 3 " in n and "--rdzv-backend multitower-rounds" in n
               for n in nodes)
