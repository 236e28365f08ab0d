"""An alpha-beta cost model of one training step under each parallel strategy.

A message of m bytes over a link costs alpha + m / beta seconds (alpha: latency per
message, beta: bandwidth in bytes/s). One step of one device costs its compute
(examples x seconds per example, measured on the device at hand) plus whatever
communication the strategy cannot hide behind that compute. Everything is in bytes,
seconds and bytes/s; only the presets speak in Gbit/s and microseconds, as vendors do.

What the model leaves out, on purpose: statistical efficiency (local SGD and downpour
take more steps to the same accuracy than sync; here only throughput is compared),
stragglers, congestion beyond the links named, and compute that gets less efficient
at small per-device batches. The planner therefore prefers an exact strategy (sync,
pipeline: the same gradient as one device) unless an approximate one is clearly faster.

Used by `multitower plan` (plan.py) and its validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Link:
    """One direction of a point-to-point link, as a collective library sees it."""
    name: str
    bandwidth_Bps: float   # beta, bytes per second in each direction
    latency_s: float       # alpha, seconds per message
    cpu_s_per_byte: float = 0.0
    """Host CPU seconds per byte a rank sends, receiving as many (the transport's copies and
    sums, the kernel's TCP): run on the cores that compute, so a CPU job cannot hide it behind
    its compute. Measured by a calibration; 0 where the transfer is offloaded (a GPU's copy
    engines, RDMA), as for the presets."""
    overlap_efficiency: float = 1.0
    """The share of its idle speed a transfer keeps while its rank's cores compute (gloo's
    threads wait for cores the compute holds). Measured by a calibration, the same
    all-reduce timed with the cores idle and busy: 0.91-1.00 for gloo between two emulated
    nodes on one core each. 1 where the transfer is offloaded, as for the presets."""
    beside_cpu_s_per_byte: float | None = None
    """Compute seconds a rank's cores lose per byte it sends while they compute beside the
    transfer: its CPU time and what waking its thread on a busy core costs the compute
    (switches, caches). Measured by a calibration (the busy core's pace beside the
    all-reduce and alone): about twice cpu_s_per_byte between emulated nodes over links of
    200 and 50 Mbit/s, as much at 1 Gbit/s. None: cpu_s_per_byte."""

    answer_cpu_s_per_byte: float = 0.0
    """CPU seconds the answering side of a request-and-reply exchange (downpour's server)
    spends per byte of a request, replying with as many: measured by the rpc calibration
    (bench/interconnect.calibrate_rpc); 0 where it was not measured."""

    @property
    def beside_cpu(self) -> float:
        return self.cpu_s_per_byte if self.beside_cpu_s_per_byte is None else self.beside_cpu_s_per_byte

    @classmethod
    def from_gbps(cls, name: str, gbps: float, latency_us: float) -> "Link":
        return cls(name, gbps * 1e9 / 8, latency_us * 1e-6)

    def describe(self) -> str:
        cpu = f", {self.cpu_s_per_byte * 1e9:.2g} ns CPU/byte" if self.cpu_s_per_byte else ""
        overlap = f", {self.overlap_efficiency:.2g} of its speed beside compute" if self.overlap_efficiency < 1 else ""
        beside = f", {self.beside_cpu_s_per_byte * 1e9:.2g} ns/byte lost by compute beside it" \
            if self.beside_cpu_s_per_byte is not None else ""
        answer = f", {self.answer_cpu_s_per_byte * 1e9:.2g} ns CPU/byte answering" if self.answer_cpu_s_per_byte else ""
        return (f"{self.name}: {self.bandwidth_Bps * 8 / 1e9:g} Gbit/s, {self.latency_s * 1e6:g} us"
                f"{cpu}{overlap}{beside}{answer}")


# Bandwidth: each direction, from the public specifications named. Latency: the vendor's
# figure where one is published (InfiniBand adapters); otherwise a typical per-message
# figure for a collective library on that link (marked "typical"), not a specification.
# Measure your own with `multitower plan --calibrate` or pass --bandwidth-gbps/--latency-us.
LINKS: dict[str, Link] = {
    # PCI-SIG PCIe 4.0 base spec: 16 GT/s per lane, 128b/130b coding; x16 = 16*16*128/130 = 252 Gbit/s
    # (31.5 GB/s) each way. Latency: typical ~2 us for a GPU-to-GPU copy through the root complex.
    "pcie4": Link.from_gbps("PCIe 4.0 x16", 252, 2.0),
    # PCI-SIG PCIe 5.0 base spec: 32 GT/s per lane -> 504 Gbit/s (63 GB/s) each way. Latency: typical.
    "pcie5": Link.from_gbps("PCIe 5.0 x16", 504, 2.0),
    # NVIDIA A100 datasheet: third-generation NVLink 600 GB/s per GPU, both directions together
    # -> 300 GB/s = 2400 Gbit/s each way. Latency: typical ~1 us for an NCCL step.
    "nvlink3": Link.from_gbps("NVLink 3 (A100)", 2400, 1.0),
    # NVIDIA H100 datasheet: fourth-generation NVLink 900 GB/s per GPU (SXM) -> 450 GB/s each way.
    "nvlink4": Link.from_gbps("NVLink 4 (H100 SXM)", 3600, 1.0),
    # NVIDIA ConnectX-6 VPI product brief: HDR InfiniBand 200 Gb/s per port, sub-600 ns latency.
    "ib-hdr": Link.from_gbps("InfiniBand HDR", 200, 0.6),
    # NVIDIA ConnectX-7 product brief: NDR InfiniBand 400 Gb/s per port; latency taken as HDR's.
    "ib-ndr": Link.from_gbps("InfiniBand NDR", 400, 0.6),
    # IEEE 802.3ae / 802.3by / 802.3ba line rates. Latency: typical one-way kernel TCP
    # (10-20 us is common; faster NICs and RDMA do better).
    "10gbe": Link.from_gbps("10 GbE", 10, 15.0),
    "25gbe": Link.from_gbps("25 GbE", 25, 10.0),
    "100gbe": Link.from_gbps("100 GbE", 100, 8.0),
}

# Exact strategies compute the gradient one device would; approximate ones do not.
EXACT = ("sync", "pipeline")
APPROXIMATE = ("local-sgd", "downpour")
STRATEGY_NAMES = EXACT + APPROXIMATE


@dataclass(frozen=True)
class Workload:
    """What one device does per step."""
    compute_s_per_example: float           # forward + backward + update, measured on one device
    param_bytes: float                     # what an all-reduce, push or fetch moves
    batch_per_device: float                # examples per device per step
    activation_bytes_per_example: float = 0.0   # crossing one pipeline stage boundary
    # Share of compute that is backward, which DDP overlaps with its all-reduce. The default
    # is the FLOPs' rule of thumb (backward costs twice forward); plan and the interconnect
    # benchmark time it (bench/step.timed_backward_share).
    backward_fraction: float = 2 / 3
    # Share of param_bytes in DDP's last gradient bucket (plan.ddp_last_bucket_share): it holds
    # the first layers' parameters, whose gradients come last, so its all-reduce starts when
    # backward ends and hides behind nothing. 1 for a model in one bucket. cifar10-tf: 0.10
    # (its convolutions; the dense layers' 3.8 MB go first). 0: every byte overlappable.
    last_bucket_share: float = 0.0
    # Pipeline, as train would cut the model into S stages (plan.pipeline_cut); empty: S
    # equal stages sending activation_bytes_per_example at every boundary. cifar10-tf cut in
    # 2 by parameters puts 95% of the multiply-adds in stage 0 and sends pool2's 9,216 bytes
    # an example: balanced stages at the mean boundary (38 KB) predicted a 2-node pipeline
    # at 1.6x its measured images/sec unshaped and 0.34x at 50 Mbit/s.
    stage_compute_shares: tuple[float, ...] = ()    # each stage's fraction of the compute
    stage_param_shares: tuple[float, ...] = ()      # each stage's fraction of param_bytes
    boundary_bytes_per_example: tuple[float, ...] = ()  # stage i -> i+1, S - 1 of them
    # Pipeline: the input a stage rank gathers from each other rank of its replica, per example
    # (parallel/pipeline.py all-gathers the images and labels each rank loaded).
    input_bytes_per_example: float = 0.0
    # A strategy's own seconds per example where its step differs: downpour and pipeline keep
    # NCHW where train's default is channels_last (1.5x slower on a CPU). (name, seconds) pairs.
    compute_by_strategy: tuple[tuple[str, float], ...] = ()

    def compute_s(self, strategy: str) -> float:
        """Seconds per example of `strategy`'s step."""
        return dict(self.compute_by_strategy).get(strategy, self.compute_s_per_example)


@dataclass(frozen=True)
class Cluster:
    """`devices` in all, packed `devices_per_node` to a node; nodes joined by `inter`."""
    devices: int
    devices_per_node: int
    intra: Link                            # between devices of one node
    inter: Link                            # between nodes: one NIC of this link per node
    nics_per_node: int = 1
    # Devices (worker processes) whose host work runs on the same cores: more than 1 where
    # emulated nodes share one machine's cores, and the CPU part of their communication
    # queues on those cores one after the other.
    cores_shared_by: int = 1
    # Devices whose cores downpour's servers run on too: 0 on a real cluster, where the servers
    # have machines of their own; the emulated cluster on 2 cores puts the server node on
    # worker 0's core (cluster/job.divide_cores), and its work slows the workers there.
    server_cores_shared_by: int = 0

    @property
    def nodes(self) -> int:
        return math.ceil(self.devices / self.devices_per_node)

    @property
    def local_devices(self) -> int:
        return min(self.devices, self.devices_per_node)


@dataclass(frozen=True)
class Knobs:
    """Strategy settings (defaults: `multitower train`'s)."""
    overlap: bool = True       # sync: all-reduce hidden behind backward (DDP buckets)
    local_sgd_period: int = 4  # K: steps between weight averages (--sync-every)
    ps: int = 1                # downpour: parameter servers (--ps)
    ps_period: int = 1         # downpour: steps between exchanges (--n-push = --n-fetch)
    stages: int = 4            # pipeline: S stages per model replica
    micro_batches: int = 0     # pipeline: M per step; 0 = 4 x stages (GPipe's M >= 4S advice)


@dataclass(frozen=True)
class Prediction:
    strategy: str
    devices: int
    step_s: float
    compute_s: float            # the step's compute (pipeline: including its bubble)
    exposed_comm_s: float       # communication not hidden behind compute
    comm_s: float               # all communication time, hidden or not
    images_per_sec: float       # all devices together
    efficiency: float           # images/sec / (devices x one device's compute-only images/sec)


def ring_allreduce_s(nbytes: float, n: int, link: Link) -> float:
    """Ring all-reduce of `nbytes` over n ranks: reduce-scatter then all-gather, 2(n-1)
    steps each moving nbytes/n: 2(n-1)/n * nbytes/beta + 2(n-1) * alpha. Zero for n = 1."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.bandwidth_Bps + 2 * (n - 1) * link.latency_s


def ring_bytes_per_rank(nbytes: float, n: int) -> float:
    """What each rank of a ring all-reduce sends (and receives): 2(n-1)/n * nbytes."""
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def host_exposed_s(wire_s: float, cpu_s: float, hideable_s: float, unhideable_share: float = 0.0,
                   beside_cpu_s: float | None = None) -> float:
    """What a transfer taking `wire_s` adds to a step: its CPU part `cpu_s` in full (it runs on
    the cores the compute needs), and of the rest its `unhideable_share` in full (sent after
    the compute ends) and what the remainder outlasts `hideable_s` of compute by. With cpu_s =
    0 (offloaded transfers) and no unhideable share it is the plain overlap max(0, wire - hideable).
    `beside_cpu_s`: what the whole transfer would take from cores computing beside it
    (Link.beside_cpu_s_per_byte); the share of the transfer that runs beside the hideable
    compute costs that much more than its CPU part."""
    rest = max(0.0, wire_s - cpu_s)
    exposed = cpu_s + rest * unhideable_share + max(0.0, rest * (1 - unhideable_share) - hideable_s)
    duration_s = max(wire_s, cpu_s)
    if beside_cpu_s is not None and duration_s > 0:
        exposed += max(0.0, beside_cpu_s - cpu_s) * min(1.0, hideable_s / duration_s)
    return exposed


def hierarchical_allreduce_s(nbytes: float, local: int, nodes: int, intra: Link, inter: Link,
                             nics_per_node: int = 1) -> float:
    """All-reduce over nodes x local ranks: ring reduce-scatter inside each node, then each
    local rank all-reduces its 1/local share across nodes (the local ranks sharing the
    node's NICs, so that leg moves nbytes per node), then ring all-gather inside the node.
    With one node it is a ring on the intra link. Cheaper than one flat ring over the
    inter link, which pays 2(N-1) inter-node latencies instead of 2(nodes-1)."""
    inside = ring_allreduce_s(nbytes, local, intra)  # reduce-scatter + all-gather together
    if nodes <= 1:
        return inside
    node_link = Link(inter.name, inter.bandwidth_Bps * nics_per_node, inter.latency_s)
    across = 2 * (nodes - 1) / nodes * nbytes / node_link.bandwidth_Bps + 2 * (nodes - 1) * inter.latency_s
    return inside + across


def cluster_allreduce_s(nbytes: float, cluster: Cluster) -> float:
    return hierarchical_allreduce_s(nbytes, cluster.local_devices, cluster.nodes, cluster.intra,
                                    cluster.inter, cluster.nics_per_node)


def cluster_allreduce_cpu_s(nbytes: float, cluster: Cluster, beside: bool = False) -> float:
    """Host CPU seconds one rank's cores spend on hierarchical_allreduce_s's all-reduce: the
    bytes it sends on each leg at that link's cpu_s_per_byte (beside: its beside_cpu, what
    cores computing beside it lose), times the ranks sharing its cores."""
    local, nodes = cluster.local_devices, cluster.nodes

    def per_byte(link: Link) -> float:
        return link.beside_cpu if beside else link.cpu_s_per_byte
    inside = ring_bytes_per_rank(nbytes, local) * per_byte(cluster.intra)
    across = ring_bytes_per_rank(nbytes, nodes) / local * per_byte(cluster.inter) if nodes > 1 else 0.0
    return (inside + across) * cluster.cores_shared_by


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a GPipe step: (S-1)/(M+S-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def _prediction(strategy: str, w: Workload, devices: int, compute_s: float, exposed_s: float,
                comm_s: float) -> Prediction:
    step_s = compute_s + exposed_s
    images = devices * w.batch_per_device / step_s
    ideal = devices / w.compute_s_per_example
    return Prediction(strategy, devices, step_s, compute_s, exposed_s, comm_s, images, images / ideal)


def predict_sync(w: Workload, cluster: Cluster, knobs: Knobs = Knobs()) -> Prediction:
    """Synchronous data parallelism: compute, plus the gradient all-reduce. Overlapped (DDP,
    host_exposed_s): on a CPU its CPU part shows in full (gloo's copies and sums take the
    cores backward needs; measured on 2 emulated nodes, an all-reduce was in flight 27% of
    the step where free overlap predicted 0% exposed); the last bucket's bytes in full (its
    gradients are backward's last); the rest where it outlasts backward, which it runs
    beside at the link's overlap_efficiency. (With every byte hidden behind 2/3 of the step
    at full speed, 2 emulated nodes over 1 Gbit/s were predicted at 1.23x their measured
    images/sec, 4 at 1.26x.) Not overlapped: all of it. Where the gradients fill more than
    one bucket, the last is an all-reduce of its own after backward, so it pays the link's
    latency once more, in full (2 emulated nodes at 1 Gbit/s: its 0.43 MB took 8.6 ms from
    DDP's handing it over to its completion, where its bytes take 2.9; a throwaway timeline
    of DDP's hooks, not a command of the repository). The part of the all-reduce beside
    backward takes from backward what the link's beside_cpu says, not only its CPU time."""
    compute_s = w.batch_per_device * w.compute_s("sync")
    wire_s = cluster_allreduce_s(w.param_bytes, cluster)
    cpu_s = cluster_allreduce_cpu_s(w.param_bytes, cluster)
    beside_cpu_s = cluster_allreduce_cpu_s(w.param_bytes, cluster, beside=True)
    link = cluster.inter if cluster.nodes > 1 else cluster.intra
    hideable_s = link.overlap_efficiency * w.backward_fraction * compute_s if knobs.overlap else 0.0
    split = knobs.overlap and 0 < w.last_bucket_share < 1
    last_bucket_latency_s = cluster_allreduce_s(0.0, cluster) if split else 0.0  # latency terms alone
    exposed = host_exposed_s(wire_s, cpu_s, hideable_s, w.last_bucket_share if knobs.overlap else 0.0,
                             beside_cpu_s)
    return _prediction("sync", w, cluster.devices, compute_s, exposed + last_bucket_latency_s,
                       max(wire_s + last_bucket_latency_s, cpu_s))


def predict_local_sgd(w: Workload, cluster: Cluster, knobs: Knobs = Knobs()) -> Prediction:
    """Local SGD: local steps, and every K steps an all-reduce of the weights after the
    optimizer step (nothing to overlap it with): comm / K per step."""
    compute_s = w.batch_per_device * w.compute_s("local-sgd")
    wire_s = cluster_allreduce_s(w.param_bytes, cluster)
    cpu_s = cluster_allreduce_cpu_s(w.param_bytes, cluster)
    comm_s = host_exposed_s(wire_s, cpu_s, 0.0) / knobs.local_sgd_period
    return _prediction("local-sgd", w, cluster.devices, compute_s, comm_s, comm_s)


def closed_network_cycle_s(customers: int, think_s: float, demands_s: list[float]) -> float:
    """Mean cycle time of `customers` that each spend `think_s` on their own (a delay: no one
    waits for anyone) and then visit, one after the other, queues shared by all of them,
    needing `demands_s[k]` of the k-th queue's server per visit: exact mean value analysis
    of a closed queueing network (Reiser and Lavenberg, 1980). A customer arriving at a
    queue with n customers in the system finds there, on average, what the system with n - 1
    holds (the arrival theorem), so its residence is demand x (1 + that queue length). One
    customer waits for no one: think_s + sum(demands_s). Many: the busiest queue's bound,
    customers x max(demands_s), from above."""
    queued = [0.0] * len(demands_s)
    cycle_s = think_s + sum(demands_s)
    for n in range(1, customers + 1):
        residence = [demand * (1 + q) for demand, q in zip(demands_s, queued)]
        cycle_s = think_s + sum(residence)
        queued = [n / cycle_s * r for r in residence]
    return cycle_s


def predict_downpour(w: Workload, cluster: Cluster, knobs: Knobs = Knobs()) -> Prediction:
    """Downpour: every `ps_period` steps each worker sends its summed gradients (param_bytes,
    spread over P servers) and gets the parameters back in the same message
    (parallel/downpour.py: the fetch is answered after the push is applied, and waited for
    before the next step), so the exchange is a request then a reply, 2 x (alpha + bytes /
    beta), hidden behind nothing; on a CPU its CPU part (host_exposed_s) queues on the cores
    with that of the workers sharing them. (Counted as a push hidden behind the next step,
    2 emulated nodes over 1 Gbit/s were predicted at 1.9x their measured images/sec.)

    The servers' links are shared: each takes in N requests and sends N replies a round,
    full duplex (Ethernet, and the emulated cluster's links, shaped in each direction). The
    workers run asynchronously, so nothing spaces their requests out: one arriving while
    another's is on the link waits behind it. So a round is a closed queueing network
    (closed_network_cycle_s): N workers, each computing on its own cores (with its own
    link's time beyond a server link's share), then queueing for the servers' incoming and
    outgoing directions, bytes / (P x beta) each. One worker waits for no one: compute +
    exchange. Many: each server link busy N x bytes / (P x beta) a round, the bound that
    caps throughput once N outgrows P. (Taken as perfectly spaced, compute + exchange up to
    that bound, 2 and 4 emulated nodes at 1 Gbit/s and 200 Mbit/s were predicted 24-49%
    fast: benchmarks/interconnect.py, docs/interconnect.md.) Where a slow link keeps the
    server busy most of a round, two workers may fall into step and alternate without
    waiting, which these queues do not see: 2 nodes at 50 Mbit/s did so in one of three
    repetitions (104 images/s, against 68 and 73 queueing, 68 predicted). Servers are P
    extra processes, not counted as devices, reached over the intra link when the job fits
    one node of several devices, else over the inter-node link; where they share cores with
    workers (cluster.server_cores_shared_by), their CPU time answering a round's N
    exchanges lengthens those workers' rounds. (Without it, 2 emulated nodes at 1 Gbit/s,
    the server on worker 0's core, were predicted +16% to +24% in four runs.)"""
    n, period = cluster.devices, knobs.ps_period
    link = cluster.intra if cluster.nodes == 1 and cluster.devices_per_node > 1 else cluster.inter
    compute_s = w.batch_per_device * w.compute_s("downpour")
    one_way_s = w.param_bytes / link.bandwidth_Bps + link.latency_s
    cpu_s = w.param_bytes * link.cpu_s_per_byte * cluster.cores_shared_by
    exchange_s = host_exposed_s(2 * one_way_s, cpu_s, 0.0)
    server_link_s = w.param_bytes / (knobs.ps * link.bandwidth_Bps)
    # The servers answer N exchanges a round; where their cores are some workers' cores, those
    # workers compute that much longer each round (the others not at all): the mean worker's share.
    server_cpu_s = n * w.param_bytes * link.answer_cpu_s_per_byte
    slowed_s = server_cpu_s * min(cluster.server_cores_shared_by, n) / n
    think_s = period * compute_s + exchange_s + slowed_s - 2 * server_link_s  # a round beside the shared links
    step_s = closed_network_cycle_s(n, think_s, [server_link_s, server_link_s]) / period
    return _prediction("downpour", w, n, compute_s, step_s - compute_s, max(2 * one_way_s, cpu_s) / period)


def _chain_s(stage_s: list[float], transfer_s: list[float], micro_batches: int) -> float:
    """M micro-batches through stages in flow order, transfer_s[k] carrying each from stage k
    to stage k + 1: the first micro-batch's way through all of them, then M-1 more at the
    pace of the slowest stage. The sender does not wait for its send (GPipe's asynchronous
    P2P), but the bytes move only once the receiver has posted its receive (gloo's TCP pair
    sends an unbound buffer after the peer's "receive ready" notice), which a stage does
    when it has finished the micro-batch before. So a receiving stage's pace is its
    incoming transfer plus its compute. (Counted as a resource of its own beside the stages,
    the transfer hidden behind the receiver's compute, 2 emulated nodes at 200 Mbit/s were
    predicted +27% in each of three repetitions.)"""
    paces = [stage_s[0], *(t + s for t, s in zip(transfer_s, stage_s[1:]))]
    return sum(stage_s) + sum(transfer_s) + (micro_batches - 1) * max(paces)


def predict_pipeline(w: Workload, cluster: Cluster, knobs: Knobs = Knobs()) -> Prediction | None:
    """GPipe-style pipeline of S stages, data-parallel over D = N/S replicas; None unless S
    divides N. A step (parallel/pipeline.py, torch's ScheduleGPipe): the replica's ranks
    all-gather the images each loaded; all M forwards flow through the stages, then all M
    backwards flow back (backward_fraction of each stage's compute), each phase a chain of
    stages and boundary transfers (_chain_s: a transfer overlaps its sender's next
    micro-batch but not its receiver's, so the slowest stage, its incoming transfer
    included, sets the pace and the others add their time once; with equal stages and free
    links this is the bubble (S-1)/(M+S-1)); then each stage all-reduces its
    parameters over the D replicas (not overlapped). Stages, their compute and boundaries as
    the workload gives them (balanced where it does not). A replica's stages sit in one node
    when S <= devices per node. (Each slot counted as the slowest stage plus both transfers,
    2 emulated nodes at 50 Mbit/s were predicted at 0.79x their measured images/sec.)"""
    s = knobs.stages
    m = knobs.micro_batches or 4 * s
    n = cluster.devices
    if s < 2 or n < s or n % s:
        return None
    replicas = n // s
    examples_per_micro = w.batch_per_device * s / m
    compute_shares = w.stage_compute_shares if len(w.stage_compute_shares) == s else (1 / s,) * s
    param_share = max(w.stage_param_shares) if len(w.stage_param_shares) == s else 1 / s
    boundaries = (w.boundary_bytes_per_example if len(w.boundary_bytes_per_example) == s - 1
                  else (w.activation_bytes_per_example,) * (s - 1))
    micro_s = examples_per_micro * w.compute_s("pipeline")
    forward_s = [micro_s * share * (1 - w.backward_fraction) for share in compute_shares]
    backward_s = [micro_s * share * w.backward_fraction for share in compute_shares]
    act_link = cluster.intra if s <= cluster.devices_per_node else cluster.inter

    def transfer_s(nbytes: float) -> float:
        wire = act_link.latency_s + nbytes / act_link.bandwidth_Bps
        return host_exposed_s(wire, nbytes * act_link.cpu_s_per_byte * cluster.cores_shared_by, 0.0)
    hops = [transfer_s(b * examples_per_micro) for b in boundaries]
    gather_s = (s - 1) * transfer_s(w.input_bytes_per_example * w.batch_per_device)  # ring all-gather
    def phases_s(transfers: list[float]) -> float:  # forward 0 .. S-1, then backward S-1 .. 0
        return _chain_s(forward_s, transfers, m) + _chain_s(backward_s[::-1], transfers[::-1], m)
    compute_s = phases_s([0.0] * (s - 1))
    pipe_s = phases_s(hops)
    # One stage's replicas: devices_per_node // S of them share a node (1 when a replica spans nodes).
    local = max(1, min(replicas, cluster.devices_per_node // s))
    nodes = math.ceil(replicas / local)
    stage_bytes = w.param_bytes * param_share
    allreduce_s = host_exposed_s(
        hierarchical_allreduce_s(stage_bytes, local, nodes, cluster.intra, cluster.inter, cluster.nics_per_node),
        cluster_allreduce_cpu_s(stage_bytes, replace(cluster, devices=replicas, devices_per_node=local)) if replicas > 1
        else 0.0, 0.0)
    comm_s = gather_s + 2 * m * sum(hops) + allreduce_s
    return _prediction("pipeline", w, n, compute_s, gather_s + pipe_s - compute_s + allreduce_s, comm_s)


def predict_all(w: Workload, cluster: Cluster, knobs: Knobs = Knobs()) -> dict[str, Prediction]:
    """Every strategy that applies at this size, by name."""
    found = {"sync": predict_sync(w, cluster, knobs), "pipeline": predict_pipeline(w, cluster, knobs),
             "local-sgd": predict_local_sgd(w, cluster, knobs), "downpour": predict_downpour(w, cluster, knobs)}
    return {name: p for name, p in found.items() if p is not None}


def winner(predictions: dict[str, Prediction], tolerance: float = 0.05) -> str:
    """The fastest strategy, except that an exact one (sync, pipeline) within `tolerance`
    of the fastest is preferred: an approximate one must buy more than that in throughput
    to pay for the extra steps it usually needs. At one device: "single"."""
    if next(iter(predictions.values())).devices == 1:
        return "single"
    best = max(p.images_per_sec for p in predictions.values())
    exact = [p for p in predictions.values() if p.strategy in EXACT and p.images_per_sec >= (1 - tolerance) * best]
    pool = exact or list(predictions.values())
    return max(pool, key=lambda p: p.images_per_sec).strategy


def device_counts(max_devices: int) -> list[int]:
    """1, 2, 4, ... up to max_devices (included even when not a power of two)."""
    counts, n = [], 1
    while n < max_devices:
        counts.append(n)
        n *= 2
    return counts + [max_devices]


def scan(w: Workload, max_devices: int, devices_per_node: int, intra: Link, inter: Link,
         knobs: Knobs = Knobs(), nics_per_node: int = 1, tolerance: float = 0.05,
         strong_scaling_batch: float | None = None) -> list[dict]:
    """One row per device count: every strategy's prediction and the winner. With
    `strong_scaling_batch` the global batch is fixed and split over the devices (rows where a
    device would get less than one example are left out); otherwise each device keeps
    w.batch_per_device (weak scaling)."""
    rows = []
    for n in device_counts(max_devices):
        work = w
        if strong_scaling_batch is not None:
            if strong_scaling_batch / n < 1:
                break
            work = replace(w, batch_per_device=strong_scaling_batch / n)
        cluster = Cluster(n, devices_per_node, intra, inter, nics_per_node)
        predictions = predict_all(work, cluster, knobs)
        rows.append({"devices": n, "nodes": cluster.nodes, "devices_per_node": cluster.local_devices,
                     "batch_per_device": work.batch_per_device, "predictions": predictions,
                     "winner": winner(predictions, tolerance)})
    return rows
