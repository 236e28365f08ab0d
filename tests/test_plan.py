"""`multitower plan`: the alpha-beta cost model on hand-computed cases, the calibration
fit, and the command end to end with a given compute time."""

import json
import math

import pytest
from PIL import Image

from multitower.bench.calibrate import calibrated_link, fit_alpha_beta, measure_allreduce, overlap_efficiency
from multitower.bench.cost_model import (LINKS, Cluster, Knobs, Link, Workload, bubble_fraction,
                                         closed_network_cycle_s, hierarchical_allreduce_s, predict_downpour,
                                         predict_local_sgd,
                                         predict_pipeline, predict_sync, ring_allreduce_s, scan, winner)
from multitower.cli import main
from multitower.errors import UserError
from multitower.plan import ddp_bucket_bytes, ddp_last_bucket_share, model_bytes, pipeline_cut, profile_compute

GBPS_1 = Link("1 GB/s, 10 us", 1e9, 10e-6)


def flat(n: int, link: Link = GBPS_1) -> Cluster:
    """n devices, one per node, every hop over the same link."""
    return Cluster(n, 1, link, link)


def test_ring_allreduce_by_hand():
    assert ring_allreduce_s(4e6, 1, GBPS_1) == 0.0  # one device: no communication
    # 4 ranks: 2 * 3/4 * 1 MB / 1 GB/s = 1.5 ms, plus 2 * 3 * 10 us = 60 us.
    assert ring_allreduce_s(1e6, 4, GBPS_1) == pytest.approx(1.5e-3 + 60e-6)
    # Bytes on the wire per rank approach 2x the message as N grows.
    assert ring_allreduce_s(1e6, 1024, Link("no latency", 1e9, 0.0)) == pytest.approx(2 * 1023 / 1024 * 1e-3)


def test_hierarchical_allreduce_by_hand():
    intra, inter = Link("intra", 100e9, 1e-6), Link("inter", 10e9, 10e-6)
    # Inside a node of 4: 2*3/4*8 MB/100 GB/s + 6 us; across 2 nodes: 2*1/2*8 MB/10 GB/s + 2*10 us.
    expected = (1.2e-4 + 6e-6) + (8e-4 + 2e-5)
    assert hierarchical_allreduce_s(8e6, 4, 2, intra, inter) == pytest.approx(expected)
    assert hierarchical_allreduce_s(8e6, 4, 1, intra, inter) == pytest.approx(1.2e-4 + 6e-6)
    assert hierarchical_allreduce_s(8e6, 4, 2, intra, inter, nics_per_node=2) == pytest.approx(1.26e-4 + 4e-4 + 2e-5)
    assert expected < ring_allreduce_s(8e6, 8, inter)  # better than one flat ring over the slow link


def test_one_device_has_no_communication():
    work = Workload(compute_s_per_example=2e-3, param_bytes=4e6, batch_per_device=128)
    for predict in (predict_sync, predict_local_sgd):
        p = predict(work, flat(1))
        assert p.comm_s == 0.0 and p.exposed_comm_s == 0.0
        assert p.step_s == pytest.approx(0.256) and p.efficiency == pytest.approx(1.0)
        assert p.images_per_sec == pytest.approx(500.0)


def test_sync_overlap_is_explicit():
    # compute 0.1 s (2/3 of it backward, 66.7 ms); all-reduce 2*1/2*50 MB/1 GB/s + 2*10 us = 50.02 ms.
    work = Workload(1e-3, 50e6, 100)
    hidden = predict_sync(work, flat(2), Knobs(overlap=True))
    serial = predict_sync(work, flat(2), Knobs(overlap=False))
    assert hidden.comm_s == pytest.approx(0.05002) and hidden.exposed_comm_s == 0.0
    assert serial.step_s == pytest.approx(0.15002)
    bigger = predict_sync(Workload(1e-3, 150e6, 100), flat(2), Knobs(overlap=True))
    assert bigger.exposed_comm_s == pytest.approx(0.15002 - 0.1 * 2 / 3)


def test_a_cpu_transport_costs_the_compute_its_cpu_time():
    """Where the transport runs on the compute cores (gloo over kernel TCP), its CPU part
    cannot hide behind backward: compute 0.1 s, an all-reduce of 50 ms on the wire of which
    2 x 1/2 x 50 MB x 0.2 ns = 10 ms is CPU."""
    cpu_link = Link("gloo on a CPU", 1e9, 10e-6, cpu_s_per_byte=0.2e-9)
    work = Workload(1e-3, 50e6, 100)
    hidden = predict_sync(work, flat(2, cpu_link), Knobs(overlap=True))
    assert hidden.exposed_comm_s == pytest.approx(0.01)
    # Two workers on the same cores (emulated nodes): their CPU parts queue, 20 ms.
    shared = predict_sync(work, Cluster(2, 1, cpu_link, cpu_link, cores_shared_by=2), Knobs(overlap=True))
    assert shared.exposed_comm_s == pytest.approx(0.02)
    # Nothing to overlap with: the wire time, or the CPU time where that is longer.
    local = predict_local_sgd(work, Cluster(2, 1, cpu_link, cpu_link, cores_shared_by=8), Knobs(local_sgd_period=2))
    assert local.exposed_comm_s == pytest.approx(max(0.05002, 8 * 0.01) / 2)
    # Longer than backward (66.7 ms): the wire's rest shows too.
    long = predict_sync(Workload(1e-3, 150e6, 100), flat(2, cpu_link), Knobs(overlap=True))
    assert long.exposed_comm_s == pytest.approx(0.03 + (0.15002 - 0.03 - 0.1 * 2 / 3))


def test_the_part_of_a_transfer_beside_backward_costs_the_compute_it_takes():
    """A core computing beside a transfer loses more than the transfer's CPU time (its thread
    woken on a busy core): Link.beside_cpu_s_per_byte, here 0.5 ns against 0.2 ns of CPU."""
    link = Link("gloo over a shaped link", 1e9, 10e-6, cpu_s_per_byte=0.2e-9, beside_cpu_s_per_byte=0.5e-9)
    # All 50 ms of the transfer run beside backward (66.7 ms): 25 ms lost, not 10.
    work = Workload(1e-3, 50e6, 100)
    assert predict_sync(work, flat(2, link), Knobs(overlap=True)).exposed_comm_s == pytest.approx(0.025)
    # Without the figure (a calibration from before it was measured): its CPU time.
    old = Link("gloo over a shaped link", 1e9, 10e-6, cpu_s_per_byte=0.2e-9)
    assert predict_sync(work, flat(2, old), Knobs(overlap=True)).exposed_comm_s == pytest.approx(0.01)
    # 150 ms on the wire: only the 66.7 ms beside backward cost the extra.
    long = predict_sync(Workload(1e-3, 150e6, 100), flat(2, link), Knobs(overlap=True))
    backward = 0.1 * 2 / 3
    assert long.exposed_comm_s == pytest.approx(0.03 + (0.15002 - 0.03 - backward) + 0.045 * backward / 0.15002)
    # Local SGD's average runs beside no compute: its CPU time, as before.
    assert predict_local_sgd(work, flat(2, link), Knobs(local_sgd_period=1)).exposed_comm_s == pytest.approx(0.05002)


def test_local_sgd_pays_one_allreduce_per_period():
    work = Workload(1e-3, 50e6, 100)
    p = predict_local_sgd(work, flat(2), Knobs(local_sgd_period=5))
    assert p.exposed_comm_s == pytest.approx(0.05002 / 5)


def test_a_closed_network_cycles_in_its_parts_alone_and_at_its_busiest_queues_bound_when_crowded():
    assert closed_network_cycle_s(1, 2.0, [1.0, 0.5]) == pytest.approx(3.5)
    # Two customers: the second finds the first's share of its cycle at each queue
    # (1 / 3.5 and 0.5 / 3.5), and waits for it on average.
    assert closed_network_cycle_s(2, 2.0, [1.0, 0.5]) == pytest.approx(2.0 + 1.0 * (1 + 1 / 3.5) + 0.5 * (1 + 0.5 / 3.5))
    crowded = closed_network_cycle_s(100, 2.0, [1.0, 0.5])
    assert crowded >= 100 * 1.0 and crowded == pytest.approx(100 * 1.0, rel=0.01)


def test_downpour_workers_queue_for_the_servers_links():
    # Each worker moves 1 MB each way per exchange, 1 ms on its own link. One worker waits
    # for no one: 1 ms of compute and 2 ms of exchange.
    work, link = Workload(1e-3, 1e6, 1), Link("no latency", 1e9, 0.0)
    assert predict_downpour(work, flat(1, link), Knobs(ps=1)).step_s == pytest.approx(3e-3)
    # Two on one server: the second's request and reply wait behind the first's for a third of
    # their 1 ms on average (the first holds each server link 1 ms of its 3 ms cycle).
    assert predict_downpour(work, flat(2, link), Knobs(ps=1)).step_s == pytest.approx((1 + 2 * (1 + 1 / 3)) * 1e-3)
    # 64 workers on 2 servers keep each server link busy 1 MB * 64 / 2 / 1 GB/s = 32 ms a
    # round in each direction (pushes in, fetches out: full duplex): the step's bound.
    crowded = predict_downpour(work, flat(64, link), Knobs(ps=2)).step_s
    assert 32e-3 < crowded < 32e-3 * 1.05
    # Exchanging every 4 steps: a round is 4 steps' compute and one exchange.
    rare = predict_downpour(work, flat(1, link), Knobs(ps=1, ps_period=4)).step_s
    assert rare == pytest.approx((4 * 1e-3 + 2e-3) / 4)


def test_downpour_servers_on_workers_cores_slow_those_workers_by_their_answers():
    """The emulated cluster on 2 cores puts the server node on worker 0's core: the server's CPU
    time answering a round's exchanges (Link.answer_cpu_s_per_byte) lengthens the rounds of
    the workers on its core."""
    work = Workload(1e-3, 1e6, 1)
    link = Link("no latency", 1e9, 0.0, answer_cpu_s_per_byte=0.5e-9)  # 0.5 ms to answer 1 MB
    own = predict_downpour(work, flat(1, link), Knobs(ps=1)).step_s
    assert own == pytest.approx(3e-3)  # servers on cores of their own: as before
    shared = predict_downpour(work, Cluster(1, 1, link, link, server_cores_shared_by=1), Knobs(ps=1)).step_s
    assert shared == pytest.approx(3.5e-3)
    # Two workers, the server on one's core: 2 x 0.5 ms of answers a round, taken by that
    # worker alone; the mean worker computes 0.5 ms longer, then queues as before.
    two = predict_downpour(work, Cluster(2, 1, link, link, server_cores_shared_by=1), Knobs(ps=1)).step_s
    assert two == pytest.approx(closed_network_cycle_s(2, 1.5e-3, [1e-3, 1e-3]))


def test_an_rpc_calibration_gives_its_answering_sides_cpu_per_byte():
    samples = [{"bytes": 4096, "median_s": 1e-3, "server_cpu_s": 1e-3},  # per-call costs: not counted
               {"bytes": 2 ** 20, "median_s": 2e-3, "server_cpu_s": 2 ** 20 * 1e-9},
               {"bytes": 2 ** 22, "median_s": 5e-3, "server_cpu_s": 2 ** 22 * 2e-9},
               {"bytes": 2 ** 23, "median_s": 9e-3, "server_cpu_s": 2 ** 23 * 4e-9}]
    rpc = calibrated_link("rpc", {"alpha_s": 1e-4, "beta_Bps": 1e8, "samples": samples})
    assert rpc.answer_cpu_s_per_byte == pytest.approx(2e-9)
    gloo = calibrated_link("gloo", {"alpha_s": 1e-4, "beta_Bps": 1e8, "samples": [{"bytes": 2 ** 22, "median_s": 5e-3}]})
    assert gloo.answer_cpu_s_per_byte == 0.0


def test_pipeline_bubble():
    assert bubble_fraction(4, 16) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 8) == 0.0
    free = Link("free", 1e30, 0.0)
    work = Workload(1e-3, 0.0, 32, activation_bytes_per_example=0.0)
    p = predict_pipeline(work, Cluster(4, 4, free, free), Knobs(stages=4, micro_batches=16))
    assert p.efficiency == pytest.approx(1 - 3 / 19)
    assert predict_pipeline(work, Cluster(6, 8, free, free), Knobs(stages=4)) is None  # 4 stages do not divide 6
    # Activations of 8 examples x 1 KB: 18 us a boundary. A send overlaps its sender's next
    # micro-batch, not its receiver's (gloo moves the bytes once the receive is posted), so
    # each receiving stage's pace is a forward (0.67 ms) plus its incoming boundary: the first
    # micro-batch's 3 boundaries and 15 more, forward and backward; and the input all-gather's
    # 3 latencies (no bytes here).
    hop = 10e-6 + 8e3 / 1e9
    slow = predict_pipeline(Workload(1e-3, 0.0, 32, 1e3), Cluster(4, 4, GBPS_1, GBPS_1),
                            Knobs(stages=4, micro_batches=16))
    assert slow.exposed_comm_s == pytest.approx(2 * (3 + 15) * hop + 3 * 10e-6)
    # 100 KB an example: 0.81 ms a boundary; every stage but the first (the last, backward)
    # receives, so the pace is a boundary plus a stage's compute, each way.
    link_bound = predict_pipeline(Workload(1e-3, 0.0, 32, 1e5), Cluster(4, 4, GBPS_1, GBPS_1),
                                  Knobs(stages=4, micro_batches=16))
    hop, forward, backward = 10e-6 + 8e5 / 1e9, 8e-3 / 4 / 3, 8e-3 / 4 * 2 / 3
    assert link_bound.step_s == pytest.approx((4 * forward + 3 * hop + 15 * (hop + forward))
                                              + (4 * backward + 3 * hop + 15 * (hop + backward)) + 3 * 10e-6)


def test_a_pipelines_transfers_hide_behind_the_sender_not_the_receiver():
    """Stages cut as train cuts cifar10-tf (nearly all compute in stage 0): forward, stage 1
    receives and its pace is the boundary plus its small forward, under stage 0's own;
    backward, stage 0 receives, so its pace is the boundary plus its large backward: the
    transfers of the 3 micro-batches after the first show in full, backward only."""
    shares, boundary = (0.9, 0.1), 1e5  # bytes an example: 0.81 ms a boundary of 8 examples
    work = Workload(1e-3, 0.0, 16, stage_compute_shares=shares, stage_param_shares=(0.5, 0.5),
                    boundary_bytes_per_example=(boundary,))
    p = predict_pipeline(work, Cluster(2, 1, GBPS_1, GBPS_1), Knobs(stages=2, micro_batches=4))
    micro = 8 * 1e-3  # 2 stages x 16 examples / 4 micro-batches, at 1 ms an example
    f0, f1 = (micro * share * (1 - work.backward_fraction) for share in shares)
    b0, b1 = (micro * share * work.backward_fraction for share in shares)
    hop = 10e-6 + 8 * boundary / 1e9
    forward = f0 + hop + f1 + 3 * max(f0, hop + f1)
    backward = b1 + hop + b0 + 3 * max(b1, hop + b0)
    assert max(f0, hop + f1) == f0 and max(b1, hop + b0) == hop + b0
    assert p.step_s == pytest.approx(10e-6 + forward + backward)  # the input all-gather: its latency


def test_pipeline_takes_the_stages_train_cuts():
    """cifar10-tf in 2 stages by parameters (train's default): stage 0 holds 95% of the
    multiply-adds, stage 1 90% of the parameters, and pool2 sends 9,216 bytes an example;
    the slowest stage sets the pace, the others add their time once."""
    cut = pipeline_cut("cifar10-tf", 1, 2)
    assert cut["stage_compute_shares"] == pytest.approx((0.948, 0.052), abs=1e-3)
    assert cut["stage_param_shares"] == pytest.approx((0.100, 0.900), abs=1e-3)
    assert cut["boundary_bytes_per_example"] == (9216.0,)
    free = Link("free", 1e30, 0.0)
    balanced = predict_pipeline(Workload(1e-3, 0.0, 32), Cluster(2, 1, free, free), Knobs(stages=2, micro_batches=4))
    cut_as_train = predict_pipeline(Workload(1e-3, 0.0, 32, **cut), Cluster(2, 1, free, free),
                                    Knobs(stages=2, micro_batches=4))
    # Balanced: 5 slots of half the model; as cut: one micro-batch of stage 1, 4 of stage 0.
    assert balanced.step_s == pytest.approx(5 * 0.5 * 16e-3)
    assert cut_as_train.step_s == pytest.approx((0.052 + 4 * 0.948) * 16e-3, rel=1e-3)
    sent = predict_pipeline(Workload(1e-9, 4e6, 32, 1e6, input_bytes_per_example=1e3, **cut),
                            Cluster(4, 1, GBPS_1, GBPS_1), Knobs(stages=2, micro_batches=4))
    # The input all-gather (10 us + 32 examples x 1 KB / 1 GB/s); 4 micro-batches through the
    # boundary each way (10 us + 16 examples x 9,216 B / 1 GB/s); then stage 1's 3.6 MB
    # all-reduced over 2 replicas.
    assert sent.exposed_comm_s == pytest.approx((10e-6 + 32e3 / 1e9) + 2 * 4 * (10e-6 + 16 * 9216 / 1e9)
                                                + (0.9 * 4e6 / 1e9 + 2 * 10e-6), rel=1e-3)
    assert pipeline_cut("cifar10-tf", 1, 8)["stage_compute_shares"] == ()  # 5 layers with parameters: no cut


def test_winner_switches_from_sync_as_latency_grows():
    # 1 ms of compute per step, 100 KB of parameters, 100 us per message: the ring's latency
    # term 2(N-1)alpha outgrows backward (0.67 ms) between 4 and 8 devices.
    work, link = Workload(1e-3, 1e5, 1), Link("slow", 1e9, 1e-4)
    rows = scan(work, 8, 1, link, link, Knobs(local_sgd_period=2, stages=4))
    assert [r["winner"] for r in rows] == ["single", "sync", "sync", "downpour"]
    at_8 = rows[-1]["predictions"]
    assert at_8["sync"].step_s == pytest.approx(1e-3 + (2 * 7 / 8 * 1e-4 + 14 * 1e-4) - 2e-3 / 3)
    assert at_8["local-sgd"].step_s == pytest.approx(1e-3 + (2 * 7 / 8 * 1e-4 + 14 * 1e-4) / 2)
    # Downpour pays one request and its reply a step (2 latencies), not the ring's 2(N-1):
    # 1.4 ms alone, and the 8 workers' waits for each other on its server's link (100 KB x 8
    # each way, 0.8 ms a round: not yet the bottleneck).
    assert at_8["downpour"].step_s == pytest.approx(closed_network_cycle_s(8, 1e-3 + 2e-4, [1e-4, 1e-4]))
    assert 1e-3 + 2 * (1e5 / 1e9 + 1e-4) < at_8["downpour"].step_s < 1e-3 + 8 * 2 * (1e5 / 1e9)
    assert at_8["downpour"].step_s < at_8["local-sgd"].step_s < at_8["sync"].step_s


def test_exact_strategy_preferred_within_tolerance():
    work = Workload(1e-3, 1e5, 1)
    predictions = {"sync": predict_sync(work, flat(4), Knobs(overlap=False)),
                   "local-sgd": predict_local_sgd(work, flat(4), Knobs(local_sgd_period=2))}
    ratio = predictions["local-sgd"].images_per_sec / predictions["sync"].images_per_sec - 1
    assert winner(predictions, tolerance=ratio + 0.01) == "sync"
    assert winner(predictions, tolerance=ratio - 0.01) == "local-sgd"


def test_sync_hides_what_backward_covers_at_the_links_overlap_efficiency():
    """compute 0.1 s, backward 2/3 of it (66.7 ms); all-reduce 50.02 ms, none of it CPU."""
    work = Workload(1e-3, 50e6, 100)
    # Beside compute the transfer keeps half its speed: 66.7 ms of backward cover 33.3 ms of it.
    half = Link("half speed beside compute", 1e9, 10e-6, overlap_efficiency=0.5)
    assert predict_sync(work, flat(2, half)).exposed_comm_s == pytest.approx(0.05002 - 0.5 * 0.1 * 2 / 3)
    # The last bucket's 20% go after backward, whatever it covers, an all-reduce of their own
    # that pays the link's latency (2 x 10 us on 2 ranks) again.
    tail = Workload(1e-3, 50e6, 100, last_bucket_share=0.2)
    assert predict_sync(tail, flat(2)).exposed_comm_s == pytest.approx(0.2 * 0.05002 + 2 * 10e-6)
    # A model in one bucket hides nothing: the whole all-reduce after backward.
    one_bucket = Workload(1e-3, 50e6, 100, last_bucket_share=1.0)
    assert predict_sync(one_bucket, flat(2)).exposed_comm_s == pytest.approx(0.05002)
    # Not overlapped (--no-overlap): all of it, the bucket layout aside.
    assert predict_sync(tail, flat(2), Knobs(overlap=False)).exposed_comm_s == pytest.approx(0.05002)


def test_ddp_bucket_bytes_by_hand():
    # DDP closes its first bucket at 1 MiB, the others at 25 MiB, in gradient-ready order.
    mib = 1024 * 1024
    assert ddp_bucket_bytes([10, 3 * mib, 5, 20 * mib, 6 * mib, 7]) == [3 * mib + 10, 26 * mib + 5, 7]
    assert ddp_bucket_bytes([100, 200]) == [300]  # under the first cap: one bucket
    assert ddp_bucket_bytes([]) == []


def test_the_last_bucket_share_is_ddps():
    """The planner's buckets are those DDP's own assignment makes of the parameters in
    gradient-ready order with its caps (the function its Reducer rebuilds them with): on
    2 ranks DDP reported rebuilt_bucket_sizes 3843880, 429312 for cifar10-tf."""
    import torch.distributed as dist

    from multitower.models import build_model
    from multitower.plan import DDP_BUCKET_BYTES, DDP_FIRST_BUCKET_BYTES
    assert DDP_FIRST_BUCKET_BYTES == dist._DEFAULT_FIRST_BUCKET_BYTES
    ready_order = list(build_model("cifar10-tf").parameters())[::-1]
    buckets, _ = dist._compute_bucket_assignment_by_size(ready_order, [DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES])
    ddp = [sum(ready_order[i].numel() * ready_order[i].element_size() for i in bucket) for bucket in buckets]
    assert ddp == [3843880, 429312]  # the dense layers first, then the convolutions
    assert ddp_bucket_bytes([p.numel() * p.element_size() for p in ready_order]) == ddp
    assert ddp_last_bucket_share("cifar10-tf", 1) == ddp[-1] / sum(ddp)


def test_overlap_efficiency_from_a_calibration():
    timings = {2 ** 20: {"median_s": 3e-3}, 4 * 2 ** 20: {"median_s": 9e-3, "overlap_idle_s": 9e-3,
                                                          "overlap_busy_s": 12e-3}}
    assert overlap_efficiency(timings) == pytest.approx(0.75)
    assert overlap_efficiency({2 ** 20: {"median_s": 3e-3}}) == 1.0  # not timed: taken as free
    faster_busy = {1: {"overlap_idle_s": 9e-3, "overlap_busy_s": 8e-3}}
    assert overlap_efficiency(faster_busy) == 1.0  # noise: no faster than free
    link = calibrated_link("measured", {"beta_Bps": 1e9, "alpha_s": 1e-5, "overlap_efficiency": 0.75})
    assert link.overlap_efficiency == 0.75
    assert calibrated_link("older file", {"beta_Bps": 1e9, "alpha_s": 1e-5}).overlap_efficiency == 1.0


def test_calibration_fit_recovers_alpha_and_beta():
    alpha, beta = 25e-6, 2.5e9
    sizes = [1024 * 4 ** k for k in range(8)]
    times = [m / beta + 2 * alpha for m in sizes]  # 2 ranks: 2(n-1)/n = 1, 2(n-1) = 2
    fitted_alpha, fitted_beta = fit_alpha_beta(sizes, times, world_size=2)
    assert fitted_alpha == pytest.approx(alpha, rel=1e-6) and fitted_beta == pytest.approx(beta, rel=1e-6)
    noisy = [t * (1 + 0.05 * math.sin(7 * i)) for i, t in enumerate(times)]  # +-5%, deterministic
    fitted_alpha, fitted_beta = fit_alpha_beta(sizes, noisy, world_size=2)
    assert fitted_alpha == pytest.approx(alpha, rel=0.15) and fitted_beta == pytest.approx(beta, rel=0.15)
    four = [2 * 3 / 4 * m / beta + 6 * alpha for m in sizes]
    assert fit_alpha_beta(sizes, four, world_size=4) == pytest.approx((alpha, beta), rel=1e-6)
    with pytest.raises(UserError, match="does not grow"):
        fit_alpha_beta(sizes, list(reversed(times)))


def test_presets_are_sane():
    assert LINKS["nvlink4"].bandwidth_Bps == pytest.approx(450e9)  # 900 GB/s both directions
    assert LINKS["ib-ndr"].bandwidth_Bps == pytest.approx(50e9)
    assert LINKS["10gbe"].bandwidth_Bps == pytest.approx(1.25e9)


def test_model_bytes():
    param_bytes, activation_bytes = model_bytes("cifar10-tf", 1)
    assert param_bytes == 1_068_298 * 4 and activation_bytes > 0


def test_the_profile_times_trains_own_step_and_takes_the_median(monkeypatch):
    """train's Single step, in train's memory format (channels_last on a CPU; the old profile
    timed its own NCHW step), warm-up untimed, the median of the repetitions."""
    import statistics
    import torch
    from multitower.config import ParallelConfig
    from multitower.parallel.single import Single
    layouts = []
    real_step = Single.step

    def spy(self, batch):
        weight = self.model.conv1.weight  # [64, 3, 5, 5]: NCHW and NHWC strides differ
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last))
        return real_step(self, batch)
    monkeypatch.setattr(Single, "step", spy)
    profile = profile_compute("cifar10-tf", 1, batch_size=4, threads=1, steps=2, warmup=1, reps=3)
    trains_with = Single.fast_path(ParallelConfig(), torch.device("cpu"))
    # 1 warm-up and 3 timed repetitions of 2 steps, then 2 more timing backward's share.
    assert trains_with.channels_last and all(layouts) and len(layouts) == (1 + 3 + 1) * 2
    assert profile.step == "train's step: fp32, channels_last"
    assert len(profile.all_s_per_example) == 3 and 0 < profile.s_per_example < 1.0
    assert profile.s_per_example == statistics.median(profile.all_s_per_example)
    assert 0 < profile.backward_share < 1


def test_a_profile_that_spreads_is_said(monkeypatch, capsys, tmp_path):
    import multitower.plan as plan
    spread = plan.Profile(1.0e-3, [0.8e-3, 1.0e-3, 1.3e-3], "train's step: fp32, channels_last")
    monkeypatch.setattr(plan, "profile_compute", lambda *args, **kwargs: spread)
    assert main(["plan", "--max-devices", "2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1.000 ms/example (measured, train's step: fp32, channels_last; " in out
    assert "warning: the profile's 3 repetitions spread 50% (0.800 .. 1.300 ms/example; the plan uses the median)" in out
    recorded = json.loads((tmp_path / "plan.json").read_text())["inputs"]["profile"]
    assert recorded["all_s_per_example"] == [0.8e-3, 1.0e-3, 1.3e-3] and recorded["spread"] == pytest.approx(0.5)
    steady = plan.Profile(1.0e-3, [0.95e-3, 1.0e-3, 1.1e-3], "train's step: fp32, channels_last")
    monkeypatch.setattr(plan, "profile_compute", lambda *args, **kwargs: steady)
    assert main(["plan", "--max-devices", "2", "--out-dir", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().out  # 15% spread: within PROFILE_SPREAD_WARN


def test_the_plot_shows_what_differs_where_efficiency_is_100_for_all():
    """A CPU's compute time (2.2 ms/example) over 25 GbE: sync, local SGD and downpour all
    draw 98-100% efficiency at 2 devices; the lower panels tell them apart."""
    import matplotlib.pyplot as plt
    from multitower.plan import PlanOptions, make_plan, plan_figure
    figure = plan_figure(make_plan(PlanOptions(compute_ms_per_example=2.2, max_devices=64)))
    rate, efficiency, comm, exposed = figure.axes
    plt.close(figure)

    def at_2(ax, name):
        (line,) = [l for l in ax.get_lines() if l.get_label() == name]
        return dict(zip(line.get_xdata(), line.get_ydata()))[2]
    names = ("sync", "local-sgd", "downpour")
    assert max(at_2(efficiency, n) for n in names) - min(at_2(efficiency, n) for n in names) < 2.5  # on top
    ms = sorted(at_2(comm, n) for n in names)  # local-sgd 0.35, sync 1.39, downpour 2.75 ms
    assert ms[1] / ms[0] > 1.5 and ms[2] / ms[1] > 1.5
    # sync hides its all-reduce behind backward but for DDP's last bucket (cifar10-tf's convolutions)
    shares = {n: at_2(exposed, n) for n in names}
    assert 0 < shares["sync"] < shares["local-sgd"] < shares["downpour"]
    markers = {l.get_label(): l.get_marker() for l in efficiency.get_lines() if l.get_label() in names}
    assert len(set(markers.values())) == 3  # drawn over each other, still three shapes


def test_plan_command_writes_table_json_and_png(capsys, tmp_path):
    code = main(["plan", "--compute-ms-per-example", "2", "--max-devices", "64", "--link", "10gbe",
                 "--devices-per-node", "4", "--intra-link", "pcie4", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2.000 ms/example (given)" in out and "winner" in out
    lines = [line.split() for line in out.splitlines()]
    assert [int(l[0]) for l in lines if l and l[0].isdigit()] == [1, 2, 4, 8, 16, 32, 64]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [r["devices"] for r in plan["rows"]] == [1, 2, 4, 8, 16, 32, 64]
    assert plan["rows"][0]["winner"] == "single" and plan["rows"][3]["nodes"] == 2
    assert set(plan["rows"][-1]["predictions"]) == {"sync", "pipeline", "local-sgd", "downpour"}
    with Image.open(tmp_path / "plan.png") as png:
        assert png.size[0] > 800 and len(png.convert("RGB").getcolors(1 << 20)) > 20


def test_plan_reads_a_benchmark_json(capsys, tmp_path):
    bench = tmp_path / "train_step.json"
    bench.write_text(json.dumps({"eager_fp32_images_per_sec": {"median": 500.0}}))
    code = main(["plan", "--from-benchmark", str(bench), "--max-devices", "2", "--out-dir", str(tmp_path)])
    assert code == 0 and "2.000 ms/example" in capsys.readouterr().out


def test_dry_run_measures_and_writes_nothing(capsys, tmp_path):
    out_dir = tmp_path / "out"
    assert main(["plan", "--dry-run", "--link", "ib-hdr", "--bandwidth-gbps", "40", "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "InfiniBand HDR, measured: 40 Gbit/s, 0.6 us" in out
    assert not out_dir.exists()


@pytest.mark.parametrize("argv, message", [
    (["--link", "pigeon"], "invalid choice"),
    (["--stages", "1"], "--stages must be at least 2"),
    (["--compute-ms-per-example", "-1"], "--compute-ms-per-example must be 0"),
    (["--calibration", "/nonexistent/cal.json", "--compute-ms-per-example", "1"], "no such file"),
    (["--from-benchmark", "/nonexistent/bench.json"], "no such file"),
    (["--calibrate", "--validate"], "separate runs"),
    (["--validate", "--validate-steps", "10"], "--validate-steps must exceed"),
])
def test_bad_input_is_one_line(capsys, tmp_path, argv, message):
    try:
        code = main(["plan", "--out-dir", str(tmp_path), *argv])
    except SystemExit as exit_:  # argparse's own errors (a bad choice) exit from parse_args
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_the_bf16_calibration_sends_what_the_bf16_hook_sends(tmp_path):
    """calibrate.py's hook="bf16" message: m bytes of bfloat16 on the wire from a 2m-byte
    float32 bucket, which one call leaves as DDP's bf16_compress_hook leaves a bucket (cast,
    divided by the ranks, summed, copied back: on one rank, the values rounded to bf16)."""
    import torch
    import torch.distributed as dist
    from multitower.bench.calibrate import _Message
    assert _Message(4096, "none").bucket.numel() == 1024
    assert _Message(4096, "bf16").bucket.numel() == 2048  # 4096 bytes once cast
    with pytest.raises(ValueError, match="hook"):
        _Message(4096, "fp16")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        message = _Message(4096, "bf16")
        values = torch.randn(message.bucket.numel(), generator=torch.Generator().manual_seed(0))
        message.bucket.copy_(values)
        message.all_reduce()
        assert torch.equal(message.bucket, values.to(torch.bfloat16).float())
        assert not torch.equal(message.bucket, values)  # rounded: the cast happened
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_calibration_on_loopback():
    result = measure_allreduce(sizes=[1024, 64 * 1024, 1024 * 1024], samples=2)
    assert result["alpha_s"] >= 0 and result["beta_Bps"] > 1e6
    assert [s["bytes"] for s in result["samples"]] == [1024, 64 * 1024, 1024 * 1024]
    # gloo on loopback copies and sums every byte on the host's cores: some CPU per byte,
    # and no more than a call's wall time (the process's threads take turns on its core).
    one_mib = result["samples"][-1]
    assert result["cpu_s_per_byte"] == pytest.approx(one_mib["cpu_median_s"] / 2 ** 20)
    assert 0 < one_mib["cpu_median_s"] <= 2 * one_mib["median_s"]
    # The largest size up to 4 MiB is timed again beside a busy core: an efficiency in (0, 1].
    assert one_mib["overlap_idle_s"] > 0 and one_mib["overlap_busy_s"] > 0
    assert 0 < result["overlap_efficiency"] <= 1
    # And the compute the busy core lost beside it, per byte sent: no more than the call's time.
    assert 0 <= one_mib["overlap_compute_lost_s"] <= one_mib["overlap_busy_s"]
    assert result["beside_cpu_s_per_byte"] == pytest.approx(one_mib["overlap_compute_lost_s"] / 2 ** 20)
    assert calibrated_link("loopback", result).beside_cpu == result["beside_cpu_s_per_byte"]
    # A calibration from before the figure was measured: the link's CPU time stands in.
    del result["beside_cpu_s_per_byte"]
    assert calibrated_link("loopback", result).beside_cpu == result["cpu_s_per_byte"]
