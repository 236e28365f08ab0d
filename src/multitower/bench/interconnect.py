"""The interconnect benchmark's parts; benchmarks/interconnect.py runs its matrix.

For a strategy's job on N emulated nodes (`multitower cluster`, network namespaces on one
host) over a link of a given rate, this module
  - measures the link as gloo sees it (calibrate_link: bench/calibrate.py's all-reduce
    timing and ring fit, run by two processes in two nodes' namespaces across the link,
    with the CPU time the transfer takes from the cores), and as downpour's rpc sees it
    (calibrate_rpc: TensorPipe requests answered by replies of the same size),
  - measures the compute per example the way the job computes (pinned_compute_s: one copy
    of train's step per worker process, in the strategy's memory format, fed by train's
    loader from the job's records, each pinned to its node's cores at its node's
    threads, all running at once, the slowest counting, as validate_plan.py does on one
    machine; on 2 cores 4 nodes share cores pairwise, and so do these copies),
  - predicts the job's images/sec with `multitower plan`'s cost model (predict), and
  - runs the job and reads its figures from metrics.jsonl (run_cell).
Nothing here tunes the model: its inputs are the measured link and compute.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from multitower.bench.calibrate import beside_cpu_per_byte, cpu_per_byte, overlap_efficiency
from multitower.bench.cost_model import Cluster, Knobs, Link, Prediction, Workload, predict_downpour, \
    predict_local_sgd, predict_pipeline, predict_sync
from multitower.errors import UserError

# Message sizes of the link calibration. A 2-rank ring all-reduce of m bytes takes 2 alpha +
# m / beta; but below tbf's 64 KiB bucket a message passes at veth speed, so no one line fits
# small and large messages alike: plan --calibrate's relative-error fit over 1 KiB .. 4 MiB
# gave a 50 Mbit/s link 51.9 Mbit/s, where 64 KiB .. 4 MiB all-reduced at 46.9-47.5 Mbit/s,
# and over 64 KiB .. 4 MiB alone an alpha of 0 (a negative intercept). So alpha comes from
# the 1 KiB all-reduce (latency alone, inside the bucket) and beta from the sizes the jobs
# send (a pipeline's micro-batch of activations ~0.15-0.3 MB, gradient buckets up to 4.27
# MB; 16 MB would take 3 s a call at 50 Mbit/s).
LATENCY_BYTES = 1024
BANDWIDTH_BYTES = [64 * 1024 * 4 ** k for k in range(4)]  # 64 KiB .. 4 MiB
CALIBRATION_BYTES = [LATENCY_BYTES, *BANDWIDTH_BYTES]
GLOBAL_BATCH = 128  # the tutorial's batch, over all workers
LOCAL_SGD_PERIOD = 4  # --sync-every: train's default
PIPELINE_STAGES, PIPELINE_MICROBATCHES = 2, 4  # --stages, --microbatches (train's defaults)
STRATEGIES = ("sync", "sync-bf16", "local-sgd", "downpour", "pipeline")


@dataclass(frozen=True)
class Setup:
    """One strategy's job on `nodes` trainer nodes, one worker process per node (downpour:
    and one server on a node of its own, --ps-node; pipeline: 2 stages x nodes/2 replicas)."""
    strategy: str
    nodes: int

    @property
    def workers(self) -> int:
        return self.nodes

    @property
    def strategy_name(self) -> str:
        """train's --strategy: sync-bf16 is sync with compressed gradients."""
        return "sync" if self.strategy == "sync-bf16" else self.strategy

    @property
    def cluster_nodes(self) -> int:
        return self.nodes + (self.strategy == "downpour")

    def train_flags(self) -> list[str]:
        flags = {"sync": ["--strategy", "sync"],
                 "sync-bf16": ["--strategy", "sync", "--grad-compression", "bf16"],
                 "local-sgd": ["--strategy", "local-sgd", "--sync-every", str(LOCAL_SGD_PERIOD)],
                 "downpour": ["--strategy", "downpour", "--ps", "1"],
                 "pipeline": ["--strategy", "pipeline", "--stages", str(PIPELINE_STAGES),
                              "--microbatches", str(PIPELINE_MICROBATCHES)]}[self.strategy]
        return [*flags, "--workers", str(self.workers), "--batch-size", str(GLOBAL_BATCH)]

    def cluster_flags(self) -> list[str]:
        return ["--nodes", str(self.cluster_nodes), *(["--ps-node"] if self.strategy == "downpour" else [])]

    def profile_batch(self) -> int:
        """Examples of one compute call of a worker: its share of the batch, or for a
        pipeline stage one micro-batch of its replica's share."""
        if self.strategy == "pipeline":
            replicas = self.workers // PIPELINE_STAGES
            return GLOBAL_BATCH // replicas // PIPELINE_MICROBATCHES
        return GLOBAL_BATCH // self.workers


# -- the link -----------------------------------------------------------------------------

def calibration_rank(rank: int, store_path: str, out_path: str, samples: int, hook: str = "none") -> None:
    """One side of calibrate_link, run inside a node's namespace (`python -m multitower.bench.
    interconnect calibrate RANK STORE SAMPLES OUT HOOK`): calibrate.py's own timing loop."""
    from multitower.bench.calibrate import _worker
    _worker(rank, 2, store_path, CALIBRATION_BYTES, samples, out_path, hook)


def _pair_across_link(rate_bps: int | None, command: str, args_of, what: str) -> dict[int, dict]:
    """Two emulated nodes joined by a link of `rate_bps` (None: unshaped), each running
    `python -m multitower.bench.interconnect COMMAND RANK *args_of(rank, nodes, tmp)` in its
    namespace, pinned to its core as `multitower cluster` pins a node; the timings per
    message size that rank 0 wrote to tmp/timings.json (args_of's last argument)."""
    from multitower.cluster.job import divide_cores
    from multitower.cluster.network import Network
    cores = divide_cores(2, 0, sorted(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="multitower-link-") as tmp, Network(2, rate_bps) as net:
        ranks = [subprocess.Popen(
            ["ip", "netns", "exec", node.namespace, sys.executable, "-m", "multitower.bench.interconnect",
             command, str(rank), *args_of(rank, net.nodes, tmp)],
            env={**os.environ, "GLOO_SOCKET_IFNAME": node.interface, "TP_SOCKET_IFNAME": node.interface},
            preexec_fn=lambda cores=cores[rank]: os.sched_setaffinity(0, cores),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank, node in enumerate(net.nodes)]
        said = [rank.communicate(timeout=900)[0] for rank in ranks]
        if any(rank.returncode for rank in ranks):
            raise UserError(f"the {what} failed: {said[0].strip().splitlines()[-1:] or said}")
        return {int(k): v for k, v in json.loads(Path(tmp, "timings.json").read_text()).items()}


def _link_result(rate_bps: int | None, alpha: float, beta: float, cpu: float, timings: dict[int, dict],
                 **more) -> dict:
    return {"rate_bps": rate_bps, **more, "alpha_s": alpha, "beta_Bps": beta, "cpu_s_per_byte": cpu,
            "beside_cpu_s_per_byte": beside_cpu_per_byte(timings),
            "overlap_efficiency": overlap_efficiency(timings),
            "latency_us": alpha * 1e6, "bandwidth_gbps": beta * 8 / 1e9, "cpu_ns_per_byte": cpu * 1e9,
            "samples": [{"bytes": m, **{k: v for k, v in timings[m].items() if k not in ("all_s", "calls")}}
                        for m in sorted(timings)]}


def calibrate_link(rate_bps: int | None, samples: int = 5, hook: str = "none") -> dict:
    """gloo all-reduce alpha, beta and CPU per byte between two emulated nodes over a link of
    `rate_bps` (None: unshaped): the ring fit of bench/calibrate.py, as `plan --calibrate`
    writes it. hook="bf16": of the bf16 compression hook's calls (calibrate.py), per byte
    of bfloat16 on the wire: the link sync --grad-compression bf16 sees."""
    timings = _pair_across_link(rate_bps, "calibrate", lambda rank, nodes, tmp: (
        str(Path(tmp, "store")), str(samples), str(Path(tmp, "timings.json")), hook), "link calibration")
    alpha, beta = fit_link({m: timings[m]["median_s"] for m in timings})
    return _link_result(rate_bps, alpha, beta, cpu_per_byte(timings), timings, hook=hook)


# -- downpour's transport -------------------------------------------------------------------

_HELD: list = []  # the reply calibrate_rpc's answering side sends back


def _answer(tensor):
    """A downpour exchange's shape: a tensor in, a tensor of the same size back."""
    if not _HELD or _HELD[0].numel() != tensor.numel():
        _HELD[:] = [tensor.clone()]
    return _HELD[0].clone()


def rpc_rank(rank: int, address: str, port: int, out_path: str, samples: int) -> None:
    """One side of calibrate_rpc, inside a node's namespace (`python -m multitower.bench.
    interconnect rpc RANK ADDRESS PORT SAMPLES OUT`): rank 0 sends each of CALIBRATION_BYTES
    as downpour sends its gradients (rpc over TensorPipe, TCP only: parallel/downpour.py's
    _network_only) and waits for the reply; rank 1 answers. Rank 0 writes its median wall and
    CPU seconds per call and rank 1's CPU seconds."""
    import torch
    import torch.distributed.rpc as rpc
    torch.set_num_threads(1)
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://{address}:{port}", rpc_timeout=600,
                                              _transports=["uv"], _channels=["basic"])
    rpc.init_rpc(f"rank{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    try:
        if rank == 0:
            timings = {}
            for nbytes in CALIBRATION_BYTES:
                tensor = torch.ones(max(1, nbytes // 4))
                calls = max(2, min(50, 4 * 2 ** 20 // nbytes))
                for _ in range(2):
                    rpc.rpc_sync("rank1", _answer, args=(tensor,))
                wall, cpu = [], []
                for _ in range(samples):
                    server_cpu = rpc.rpc_sync("rank1", time.process_time)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    for _ in range(calls):
                        rpc.rpc_sync("rank1", _answer, args=(tensor,))
                    wall.append((time.perf_counter() - start) / calls)
                    cpu.append((time.process_time() - cpu_start) / calls)
                    server_cpu = (rpc.rpc_sync("rank1", time.process_time) - server_cpu) / calls
                timings[nbytes] = {"median_s": statistics.median(wall), "cpu_median_s": statistics.median(cpu),
                                   "server_cpu_s": server_cpu}
            Path(out_path).write_text(json.dumps(timings))
    finally:
        rpc.shutdown()


def calibrate_rpc(rate_bps: int | None, samples: int = 5) -> dict:
    """Downpour's exchange across a link of `rate_bps` (None: unshaped) between two emulated
    nodes: a request of m bytes answered by m bytes, over rpc as downpour runs it. Fitted as
    a link crossed twice (t = 2 alpha + 2 m / beta: fit_link on t / 2), its cpu_s_per_byte
    the requesting side's CPU per byte sent (receiving as many)."""
    timings = _pair_across_link(rate_bps, "rpc", lambda rank, nodes, tmp: (
        nodes[0].address, "29511", str(samples), str(Path(tmp, "timings.json"))), "rpc calibration")
    alpha, beta = fit_link({m: t["median_s"] / 2 for m, t in timings.items()})
    return _link_result(rate_bps, alpha, beta, cpu_per_byte(timings), timings)


def fit_link(median_s: dict[int, float]) -> tuple[float, float]:
    """(alpha s, beta bytes/s) of a 2-rank ring all-reduce, t = 2 alpha + m / beta, from median
    times per message size: alpha half the LATENCY_BYTES time, beta the median over the
    BANDWIDTH_BYTES of m / (t - 2 alpha) (see CALIBRATION_BYTES)."""
    alpha = median_s[LATENCY_BYTES] / 2
    rates = [m / (median_s[m] - 2 * alpha) for m in BANDWIDTH_BYTES if median_s[m] > 2 * alpha]
    if not rates:
        raise UserError(f"the link calibration's large messages took no longer than its {LATENCY_BYTES}-byte one: "
                        f"{median_s}; the machine is too busy to calibrate now")
    return alpha, statistics.median(rates)


# -- the compute -----------------------------------------------------------------------------

def _profile_copy(rank: int, barrier, cores: list[list[int]], threads: list[int], batch: int, steps: int,
                  reps: int, out_dir: str, channels_last: bool, data_dir: str) -> None:
    from multitower.data.records import open_dataset
    from multitower.plan import profile_compute
    os.sched_setaffinity(0, cores[rank])
    split = open_dataset(data_dir).split("train")
    barrier.wait()  # the copies contend for the cores only if they run at the same time
    profile = profile_compute("cifar10-tf", 1, batch, threads[rank], steps, reps=reps, channels_last=channels_last,
                              split=split)
    Path(out_dir, f"{rank}.json").write_text(json.dumps([profile.s_per_example, profile.backward_share]))


def node_layout(setup: Setup) -> tuple[list[list[int]], list[int]]:
    """(cores, threads) of each worker process as `multitower cluster` gives them: node I's
    share of the cores (cluster/job.py divide_cores), its threads the share's size (one
    worker per node). Downpour's server node takes a share too, but computes no steps."""
    shares = node_shares(setup)[:setup.workers]
    return shares, [len(share) for share in shares]


def node_shares(setup: Setup) -> list[list[int]]:
    """Every node's cores as `multitower cluster` divides them (cluster/job.py divide_cores),
    downpour's server node last."""
    from multitower.cluster.job import divide_cores
    return divide_cores(setup.cluster_nodes, 0, sorted(os.sched_getaffinity(0)))


def cores_shared_by(setup: Setup) -> int:
    """The most worker processes node_layout puts on one core (2 for 4 nodes on 2 cores)."""
    cores, _ = node_layout(setup)
    return max(sum(core in share for share in cores) for core in {c for share in cores for c in share})


def server_cores_shared_by(setup: Setup) -> int:
    """Worker processes on the cores of downpour's server node (its last node): 1 for 2 nodes
    on 2 cores (the server on worker 0's core), 2 for 4; 0 for the other strategies."""
    if setup.strategy != "downpour":
        return 0
    shares = node_shares(setup)
    server = set(shares[-1])
    return sum(bool(server & set(share)) for share in shares[:setup.workers])


def pinned_compute_s(setup: Setup, data_dir: str, steps: int = 10, reps: int = 3) -> dict:
    """Seconds per example of train's step at the worker's batch (profile_batch), in the
    strategy's memory format (plan.keeps_nchw), on batches from `data_dir`'s records through
    train's loader, one copy per worker process pinned as the job pins it, all at once: the
    slowest copy's median; and the median copy's share of the step in backward."""
    import torch.multiprocessing as mp
    from multitower.plan import keeps_nchw
    cores, threads = node_layout(setup)
    channels_last = not keeps_nchw(setup.strategy_name)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="multitower-profile-") as tmp:
        mp.spawn(_profile_copy, nprocs=setup.workers, join=True,
                 args=(ctx.Barrier(setup.workers), cores, threads, setup.profile_batch(), steps, reps, tmp,
                       channels_last, str(data_dir)))
        copies, shares = zip(*(json.loads(Path(tmp, f"{rank}.json").read_text()) for rank in range(setup.workers)))
    return {"s_per_example": max(copies), "copies_s_per_example": list(copies),
            "backward_share": statistics.median(shares), "batch": setup.profile_batch(),
            "cores": cores, "threads": threads, "layout": "channels_last" if channels_last else "NCHW",
            "loader": True}


# -- the prediction -----------------------------------------------------------------------------

def predict(setup: Setup, compute_s_per_example: float, link: Link, param_bytes: float,
            activation_bytes_per_example: float, cut: dict, rpc_link: Link | None = None,
            backward_fraction: float = Workload.backward_fraction, bf16_link: Link | None = None) -> Prediction:
    """plan's cost model (bench/cost_model.py) for the setup, with plan's inputs (`cut`:
    plan.pipeline_cut at PIPELINE_STAGES): one device per node, every node on `link` (gloo's,
    as calibrated; downpour's exchange on `rpc_link`, its rpc calibrated across the same
    link), the workers sharing cores as node_layout pins them, `backward_fraction` as the
    profile measured it (pinned_compute_s). sync-bf16 is plan's sync with
    the gradient's bytes halved (what the bf16 hook sends) over `bf16_link`, the link
    calibrated with the hook's casts and bfloat16 sums (calibrate_link(hook="bf16"); else
    `link`: the bytes halved alone predicted it 16-56% fast); plan has no compression flag
    of its own."""
    from multitower.plan import ddp_last_bucket_share, input_bytes_per_example
    workers = setup.workers
    shared = cores_shared_by(setup)
    cluster = Cluster(workers, 1, link, link, cores_shared_by=shared)
    work = Workload(compute_s_per_example, param_bytes, GLOBAL_BATCH / workers, activation_bytes_per_example,
                    input_bytes_per_example=input_bytes_per_example("cifar10-tf", 1),
                    backward_fraction=backward_fraction, last_bucket_share=ddp_last_bucket_share("cifar10-tf", 1),
                    **cut)
    if setup.strategy == "sync":
        return predict_sync(work, cluster, Knobs(overlap=True))
    if setup.strategy == "sync-bf16":
        bf16_link = bf16_link or link
        return predict_sync(replace(work, param_bytes=param_bytes / 2), replace(cluster, intra=bf16_link, inter=bf16_link),
                            Knobs(overlap=True))
    if setup.strategy == "local-sgd":
        return predict_local_sgd(work, cluster, Knobs(local_sgd_period=LOCAL_SGD_PERIOD))
    if setup.strategy == "downpour":
        rpc_link = rpc_link or link
        return predict_downpour(work, Cluster(workers, 1, rpc_link, rpc_link, cores_shared_by=shared,
                                              server_cores_shared_by=server_cores_shared_by(setup)),
                                Knobs(ps=1, ps_period=1))
    return predict_pipeline(work, cluster, Knobs(stages=PIPELINE_STAGES, micro_batches=PIPELINE_MICROBATCHES))


# -- the measured run -----------------------------------------------------------------------------

@dataclass
class Measured:
    images_per_sec: float
    """Median over the kept log windows of the sum of every rank's examples/sec."""
    comm_fraction: float
    """Median of the windows' communication share of step time (the slowest rank's)."""
    bytes_per_step: float
    """Bytes a worker sends per step (its strategy's comm_bytes, rank 0's), mean of the windows."""
    windows: list[dict] = field(default_factory=list)
    """The metrics.jsonl records the figures come from."""
    wall_s: float = 0.0
    """The whole command's seconds, start-up and teardown included."""


class CellFailed(UserError):
    """A cell's job failed: its one line, and the job's whole output to keep."""

    def __init__(self, line: str, output: str):
        super().__init__(line)
        self.output = output


def run_cell(setup: Setup, link: str, data_dir: str, run_dir: Path, steps: int, log_every: int,
             warmup_steps: int, extra: tuple[str, ...] = ()) -> Measured:
    """`multitower cluster` for the setup on `link`; the log windows after warmup_steps."""
    command = [sys.executable, "-m", "multitower", "cluster", *setup.cluster_flags(), "--link", link, "--", "train",
               "--data", data_dir, "--run-dir", str(run_dir), *setup.train_flags(), "--steps", str(steps),
               "--log-every", str(log_every), "--summary-every", "0", "--checkpoint-every", str(steps),
               "--progress", "off", *extra]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.monotonic() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise CellFailed(f"{setup.strategy} on {setup.cluster_nodes} nodes over {link} failed: {last}",
                         done.stdout + done.stderr)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] > warmup_steps] or records[-1:]
    return Measured(images_per_sec=statistics.median(sum(r["rank_examples_per_sec"]) for r in kept),
                    comm_fraction=statistics.median(r["comm_fraction"] for r in kept),
                    bytes_per_step=statistics.mean(r.get("comm_bytes", 0.0) for r in kept),
                    windows=kept, wall_s=wall_s)


_DONE = re.compile(r"\[node 0\] done: step (\d+), loss ([\d.naif-]+), ([\d.]+) s")


def trained_wall_s(stdout: str) -> float | None:
    """Rank 0's training time in a cluster job's output ("[node 0] done: step N, loss L, W s")."""
    found = _DONE.findall(stdout)
    return float(found[-1][2]) if found else None


def main(argv: list[str]) -> None:
    if argv[:1] == ["calibrate"]:
        rank, store, samples, out, hook = argv[1:]
        calibration_rank(int(rank), store, out, int(samples), hook)
    elif argv[:1] == ["rpc"]:
        rank, address, port, samples, out = argv[1:]
        rpc_rank(int(rank), address, int(port), out, int(samples))
    else:
        raise SystemExit("usage: python -m multitower.bench.interconnect calibrate RANK STORE SAMPLES OUT HOOK | "
                         "rpc RANK ADDRESS PORT SAMPLES OUT")


if __name__ == "__main__":
    main(sys.argv[1:])
