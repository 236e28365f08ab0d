"""`multitower cluster`: emulated nodes in network namespaces on one host.

Plumbing (namespaces, switch, tc shaping measured over TCP, teardown, leftovers of a killed
run, signals) and the key check: a 2-node sync job over a shaped link ends bitwise equal
to the 1-node 2-worker run. Tests that make namespaces need root (CAP_SYS_ADMIN and
CAP_NET_ADMIN) and are skipped, with the reason, where namespaces cannot be made.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from multitower.cli import main
from multitower.cluster import network
from multitower.attempt import ATTEMPT_ENV, current_attempt
from multitower.cluster.job import NodeLaunch, _Output, divide_cores, failure_line
from multitower.cluster.network import Network, check_rights, parse_rate, remove_stale, tbf_parameters
from multitower.errors import UserError
from multitower.procs import process_state
from multitower.train.checkpoint import CheckpointDir

TRAIN_FLAGS = ["--steps", "6", "--batch-size", "32", "--summary-every", "0", "--log-every", "2",
               "--checkpoint-every", "3"]


@pytest.fixture(scope="session")
def namespaces():
    """Skip unless this process can make (and remove) a network namespace."""
    try:
        check_rights()
        Network(1, None).create().teardown()
    except (UserError, OSError) as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc}")


def multitower(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "multitower", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def ours_left() -> list[str]:
    """Namespaces, /etc/netns folders and lock files of any cluster, in the host."""
    if shutil.which("ip") is None:
        return []
    names = [ns for ns in network._namespaces() if ns.startswith(network.PREFIX)]
    locks = [p.name for p in network.LOCK_DIR.glob("*cluster-*")] if network.LOCK_DIR.is_dir() else []
    return names + locks


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for init to reap it)."""
    return process_state(pid) not in ("Z", None)


def host_links() -> list[str]:
    return sorted(line.split(":")[1].strip() for line in
                  subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines())


# -- rates, cores, rights: no root needed --------------------------------------------------

def test_rates_parse_as_tc_writes_them():
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("50mbit") == 50 * 10**6
    assert parse_rate("200MBIT") == 200 * 10**6
    assert parse_rate("1.5gbit") == 1_500_000_000
    assert parse_rate("10mbps") == 80 * 10**6  # tc: bytes per second
    assert parse_rate("100mibit") == 100 * 2**20
    assert parse_rate("unshaped") is None and parse_rate("none") is None


@pytest.mark.parametrize("bad", ["fast", "100", "1 gigabit", "0mbit", "500kbit", "200gbit", "-1mbit", ""])
def test_a_bad_rate_is_refused_in_one_line(bad):
    with pytest.raises(UserError) as info:
        parse_rate(bad)
    assert "\n" not in str(info.value) and "--link" in str(info.value)


def test_bad_rate_on_the_command_line_is_one_line(capsys, synth_dir):
    code = main(["cluster", "--nodes", "2", "--link", "fastest", "--", "train", "--data", str(synth_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--link 'fastest' is not a rate" in err[0], err


def test_tbf_burst_holds_a_gso_packet_and_the_queue_50_ms():
    burst, limit = tbf_parameters(50 * 10**6)
    assert burst == 64 * 1024 and limit == burst + 312_500
    burst, limit = tbf_parameters(10**9)
    assert burst == 125_000 and limit == burst + 6_250_000


def test_cores_are_divided_and_shared_when_too_few():
    assert divide_cores(2, 0, [0, 1]) == [[0], [1]]
    assert divide_cores(4, 0, [0, 1]) == [[0], [1], [0], [1]]
    assert divide_cores(2, 0, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    with pytest.raises(UserError, match="--cores-per-node 3"):
        divide_cores(2, 3, [0, 1])


def test_node_addresses_sort_as_text_in_node_order():
    """c10d ranks the agents by sorting their --local-addr strings: node i must be rank i."""
    addresses = [network.address_of(i) for i in range(network.MAX_NODES)]
    assert sorted(addresses) == addresses and addresses[0] == "198.18.0.100"


def test_a_nodes_failure_line_is_its_own_error():
    output = _Output.__new__(_Output)  # its parsing alone, without a process to read
    output.tail = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                   "RuntimeError: Gloo connectFullMesh failed", "torch.distributed.elastic.multiprocessing."
                   "errors.ChildFailedError: ", "=" * 60]
    assert output.reason() == "raised RuntimeError: Gloo connectFullMesh failed"
    output.tail = ["[rank3]: multitower.faults.InjectedFault: injected", "multitower: error: rank 3 stopped"]
    assert output.reason() == "rank 3 stopped"
    output.tail = ["[rank3]: multitower.faults.InjectedFault: injected fault", "exitcode  : 1"]
    assert output.reason() == "rank 3 raised InjectedFault: injected fault"


class _Exited:
    def __init__(self, returncode):
        self.returncode = returncode


def _failed_nodes(*nodes):
    """(launches, agents, outputs) of nodes given as (exit status, lines of output)."""
    launches = [NodeLaunch(network.Node(i, f"mt-00000000-n{i}", network.address_of(i)), [0], [], {})
                for i in range(len(nodes))]
    outputs = []
    for _, tail in nodes:
        output = _Output.__new__(_Output)
        output.tail = tail
        outputs.append(output)
    return launches, [_Exited(code) for code, _ in nodes], outputs


def test_the_failure_line_names_the_node_that_went_silent():
    silent = ("multitower: error: rank 1 (node 1, pid 42) stopped responding during step 15: no sign of life for "
              "10 s (frozen, killed, or its machine unreachable); rank 0 (node 0, pid 41) gave up waiting (--timeout 10 s)")
    lost = "multitower: error: rank 1 (node 1, pid 42) lost the launcher's store at 198.18.0.100:1 (node 0) for 11 s"
    # A cut link: each side finds the other silent; node 1's launcher we SIGKILLed while it lingered.
    cut = _failed_nodes((1, [silent]), (-9, [lost]))
    assert failure_line(*cut, failed={0: 1.0, 1: 2.0}, stopped={1}) == (
        "node 1 (198.18.0.101) stopped responding, as node 0 reports: " + silent.removeprefix("multitower: error: "))
    # Node 1 killed whole (not by us): its own failure comes before node 0's verdict on it.
    gone = _failed_nodes((1, [silent]), (-9, ["step 12, loss = 4.1"]))
    assert failure_line(*gone, failed={0: 2.0, 1: 1.0}, stopped=set()) == (
        "node 1 (198.18.0.101) failed with SIGKILL: its launcher was killed with everything on the node "
        "(the machine went down?)")
    # Node 1's worker killed: torchrun's report of it.
    report = ["Root Cause (first observed failure):", "[0]:", "  rank      : 1 (local_rank: 0)",
              "  exitcode  : -9 (pid: 4242)  (SIGKILL)", "=" * 40]
    crashed = _failed_nodes((1, [silent]), (1, report))
    assert failure_line(*crashed, failed={0: 1.0, 1: 1.5}, stopped=set()) == (
        "node 1 (198.18.0.101) failed with exit status 1: rank 1 (pid 4242) was killed by SIGKILL (out of memory, "
        "or killed)")


def test_the_attempt_is_the_clusters_where_it_says_one(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a healthy node's agent, restarted for the new round
    monkeypatch.delenv(ATTEMPT_ENV, raising=False)
    assert current_attempt() == 0
    monkeypatch.setenv(ATTEMPT_ENV, "1")  # the round number node 0's agent published (cluster/agent.py)
    assert current_attempt() == 1


def test_without_the_capabilities_it_says_what_is_needed(monkeypatch):
    monkeypatch.setattr(network, "effective_capabilities", lambda: 0)
    with pytest.raises(UserError, match="needs root .*CAP_SYS_ADMIN.*CAP_NET_ADMIN"):
        check_rights()


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_a_process_without_the_rights_fails_in_one_line(synth_dir):
    """Root, but with the two capabilities dropped from the bounding set (so from the
    exec'd process's effective set): the command ends at once with one line, status 2."""
    drop = "-sys_admin,-net_admin"
    result = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-m",
                             "multitower", "cluster", "--nodes", "2", "--", "train", "--data", str(synth_dir)],
                            capture_output=True, text=True, timeout=60)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert err[0].startswith("multitower: error: multitower cluster needs root"), err


def test_dry_run_prints_each_nodes_launcher(synth_dir, tmp_path):
    result = multitower("cluster", "--nodes", "2", "--link", "1gbit", "--dry-run", "--", "train", "--data",
                        str(synth_dir), "--workers", "2", "--run-dir", str(tmp_path / "run"), *TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr
    nodes = [line for line in result.stdout.splitlines() if re.match(r"node \d \(198\.18\.0\.10\d, cores", line)]
    assert len(nodes) == 2, result.stdout
    assert "is_host=1" in nodes[0] and "is_host=0" in nodes[1]
    assert "--local-addr 198.18.0.100" in nodes[0] and "--rdzv-endpoint 198.18.0.100:29400" in nodes[1]
    assert "--nproc-per-node 1" in nodes[0] and "GLOO_SOCKET_IFNAME=eth0" in nodes[0]
    assert not (tmp_path / "run").exists() and not ours_left()


def test_nodes_out_of_range_are_refused_in_one_line(capsys, synth_dir):
    code = main(["cluster", "--nodes", "0", "--dry-run", "--", "train", "--data", str(synth_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["multitower: error: --nodes must be from 1 to 64, got 0"], err


def test_workers_that_do_not_divide_among_the_nodes_are_refused(synth_dir, tmp_path):
    result = multitower("cluster", "--nodes", "2", "--dry-run", "--", "train", "--data", str(synth_dir),
                        "--workers", "3", "--batch-size", "30", "--run-dir", str(tmp_path / "run"))
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and "cannot be divided among --nodes 2" in err[0], err


# -- the network ---------------------------------------------------------------------------

def qdisc(namespace: str, device: str) -> str:
    return subprocess.run(["tc", "-n", namespace, "qdisc", "show", "dev", device],
                          capture_output=True, text=True).stdout


def test_nodes_switch_shaping_and_teardown_leave_nothing(namespaces):
    links_before = host_links()
    with Network(3, parse_rate("50mbit")) as net:
        present = set(network._namespaces())
        assert set(net.namespaces) <= present
        for node in net.nodes:
            assert "tbf" in qdisc(node.namespace, "eth0") and "rate 50Mbit" in qdisc(node.namespace, "eth0")
            assert "rate 50Mbit" in qdisc(net.switch, f"n{node.index}")  # the node's ingress
            hosts = (network.ETC_NETNS / node.namespace / "hosts").read_text()
            assert f"{node.address} node{node.index}" in hosts
        assert host_links() == links_before  # every link lives inside the cluster's namespaces
        assert (network.LOCK_DIR / f"cluster-{net.run_id}.lock").exists()
    assert not set(net.namespaces) & set(network._namespaces())
    assert not (network.LOCK_DIR / f"cluster-{net.run_id}.lock").exists()
    assert host_links() == links_before


RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 5201))
print("ready", flush=True)
conn, _ = server.accept()
received, start = 0, None
while chunk := conn.recv(1 << 16):
    start = start or time.perf_counter()
    received += len(chunk)
print(received * 8 / (time.perf_counter() - start))
"""
SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], 5201), timeout=30) as conn:
    conn.sendall(b"x" * int(sys.argv[2]))
"""


def measured_bps(net: Network, sender: int, receiver: int, size: int) -> float:
    """Bits per second that `size` bytes took over TCP from one node to another, timed by
    the receiver from its first byte (so without connection set-up)."""
    to = net.nodes[receiver]
    rx = subprocess.Popen(["ip", "netns", "exec", to.namespace, sys.executable, "-c", RECEIVER, to.address],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", net.nodes[sender].namespace, sys.executable, "-c", SENDER,
                        to.address, str(size)], check=True, timeout=60)
        return float(rx.communicate(timeout=60)[0])
    finally:
        rx.kill()
        rx.wait()


def test_a_shaped_link_carries_its_rate_and_an_unshaped_one_far_more(namespaces):
    target = 50 * 10**6
    with Network(2, target) as net:
        # 4 MB: 0.7 s at 50 Mbit/s, long enough that the 64 KiB bucket's burst is 2% of it.
        rates = [measured_bps(net, 0, 1, 4 * 10**6), measured_bps(net, 1, 0, 4 * 10**6)]
    with Network(2, None) as net:
        unshaped = measured_bps(net, 0, 1, 40 * 10**6)
    print(f"50mbit link: {rates[0] / 1e6:.1f} and {rates[1] / 1e6:.1f} Mbit/s; unshaped {unshaped / 1e6:.0f} Mbit/s")
    for rate in rates:  # TCP/IP headers take ~3%; the band is wide for a shared host
        assert 0.6 * target < rate < 1.1 * target, rates
    assert unshaped > 10 * target, unshaped


KILLED_OWNER = """
import os, signal, subprocess, sys
from multitower.cluster.network import Network, agent_log_dir
net = Network(2, None, run_id=sys.argv[1]).create()
(agent_log_dir(net.run_id) / "node0" / "attempt_0").mkdir(parents=True)  # as its launchers would have
subprocess.Popen(["ip", "netns", "exec", net.nodes[0].namespace, "sleep", "300"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(net.nodes[0].namespace, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 would: no teardown runs
"""


def test_leftovers_of_a_killed_run_are_removed_and_live_clusters_kept(namespaces):
    live = Network(1, None).create()  # another cluster, alive meanwhile
    try:
        owner = subprocess.run([sys.executable, "-c", KILLED_OWNER, "deadbeef"], capture_output=True, text=True,
                               timeout=60)
        assert owner.returncode == -signal.SIGKILL, owner.stderr
        node0 = owner.stdout.strip()
        deadline = time.monotonic() + 10
        while not network.namespace_pids(node0) and time.monotonic() < deadline:
            time.sleep(0.1)
        sleeper = network.namespace_pids(node0)
        assert sleeper, "the killed run's process did not start"
        removed = remove_stale()
        assert sorted(removed) == ["mt-deadbeef-n0", "mt-deadbeef-n1", "mt-deadbeef-sw"]
        assert not any(_running(pid) for pid in sleeper)
        assert set(live.namespaces) <= set(network._namespaces())
        assert not [name for name in ours_left() if "deadbeef" in name]
        assert not network.agent_log_dir("deadbeef").exists()
    finally:
        live.teardown()
    assert not [name for name in ours_left() if live.run_id in name]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_job_and_removes_the_cluster(namespaces, synth_dir, tmp_path, sig, status):
    job = subprocess.Popen([sys.executable, "-m", "multitower", "cluster", "--nodes", "2", "--link", "1gbit", "--",
                            "train", "--data", str(synth_dir), "--workers", "2", "--run-dir", str(tmp_path / "run"),
                            "--steps", "100000", "--batch-size", "32", "--summary-every", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = None
        while started is None:  # a line about a killed run's leftovers may come first
            line = job.stdout.readline()
            assert line, job.stderr.read()
            started = re.match(r"cluster ([0-9a-f]{8}):", line)
        run_id = started.group(1)
        deadline = time.monotonic() + 60  # until both nodes' launchers run
        while time.monotonic() < deadline and not all(network.namespace_pids(f"mt-{run_id}-n{i}") for i in (0, 1)):
            time.sleep(0.2)
        job.send_signal(sig)
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == status, err
    last = err.strip().splitlines()[-1]
    assert last == (f"multitower: interrupted by {sig.name}: stopped the job on 2 nodes and removed its network")
    assert not [name for name in ours_left() if run_id in name]
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and run_id in _cmdline(pid)]


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return ""


# -- the job ---------------------------------------------------------------------------------

def _process_tree(root: int) -> list[int]:
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                queue += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass  # ended meanwhile
    return pids


def _listening(pid: int) -> tuple[str | None, int]:
    """(the process's network namespace, how many TCP sockets it holds that listen there)."""
    try:
        netns = os.readlink(f"/proc/{pid}/ns/net")
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
        listening = 0
        for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):  # the table of its namespace
            for line in open(table).read().splitlines()[1:]:
                fields = line.split()
                listening += fields[3] == "0A" and fields[9] in inodes  # 0A: LISTEN
        return netns, listening
    except OSError:
        return None, 0


def test_two_nodes_over_a_shaped_link_end_bitwise_equal_to_one_node_two_workers(namespaces, synth_dir, tmp_path):
    """The emulated 2-node x 1-worker sync job and `train --workers 2` on this host compute
    the same thing: every model and moving-average tensor of the final checkpoints is
    equal, and so are both replicas of the cluster job (their digests, in the checkpoint). Meanwhile no process of the job listens in the host's network namespace
    (the stores and gloo listen inside the nodes), rank 0 (node 0) alone writes, and neither
    job leaves a launcher's folder in the temporary folder."""
    host_netns = os.readlink("/proc/self/ns/net")
    common = ["--data", str(synth_dir), "--workers", "2", *TRAIN_FLAGS]
    temp = tmp_path / "tmp"  # both jobs' temporary folder: torch's launcher leaves nothing in it
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    started = time.monotonic()
    job = subprocess.Popen([sys.executable, "-m", "multitower", "cluster", "--nodes", "2", "--link", "1gbit", "--",
                            "train", "--run-dir", str(tmp_path / "nodes"), *common],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # The control at the same time: both mostly wait for imports, and run 1 thread per worker either way.
    control = subprocess.Popen([sys.executable, "-m", "multitower", "train", "--run-dir", str(tmp_path / "one"),
                                *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    in_host, in_nodes = 0, 0  # most listening sockets seen at once, in the host's namespace and in the nodes'
    while job.poll() is None:
        seen = [_listening(pid) for pid in _process_tree(job.pid)]
        in_host = max(in_host, sum(n for netns, n in seen if netns == host_netns))
        in_nodes = max(in_nodes, sum(n for netns, n in seen if netns not in (None, host_netns)))
        time.sleep(0.2)
    out, err = job.communicate()
    print(f"cluster job {time.monotonic() - started:.1f} s (with the control alongside)")
    assert job.returncode == 0, err + out[-3000:]
    control_err = control.communicate(timeout=300)[1]
    assert control.returncode == 0, control_err

    nodes, one = (CheckpointDir(tmp_path / name / "checkpoints").load() for name in ("nodes", "one"))
    assert nodes["step"] == one["step"] == 6
    for part in ("model", "ema"):
        assert nodes[part].keys() == one[part].keys()
        unequal = [name for name in one[part] if not torch.equal(nodes[part][name], one[part][name])]
        assert not unequal, f"{part} tensors differ: {unequal}"

    assert len(nodes["replica_digests"]) == 2 and len(set(nodes["replica_digests"])) == 1  # rank 1's replica too
    assert in_host == 0, "a process of the cluster job listened in the host's network namespace"
    assert in_nodes >= 2, f"the job's listening sockets were not seen in the nodes ({in_nodes})"
    assert "[node 0] done: step 6" in out  # global rank 0 runs on node 0
    # Written once, by rank 0: the checkpoints of steps 3 and 6, each once; one record per log line.
    index = json.loads((tmp_path / "nodes" / "checkpoints" / "index.json").read_text())
    assert [entry["step"] for entry in index["checkpoints"]] == [3, 6]
    assert sorted(p.name for p in (tmp_path / "nodes" / "checkpoints").iterdir()) == \
        ["index.json", "step-00000003.pt", "step-00000006.pt"]
    records = [json.loads(line) for line in (tmp_path / "nodes" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6] and records[-1]["world_size"] == 2
    assert not ours_left()
    left = [p.name for p in temp.iterdir() if "torchelastic" in p.name or p.name.startswith("multitower-")]
    assert not left, f"the launchers left {left} in the temporary folder"


@pytest.mark.slow
def test_a_failing_node_is_named_in_one_line(namespaces, synth_dir, tmp_path):
    result = multitower("cluster", "--nodes", "2", "--", "train", "--data", str(synth_dir), "--workers", "2",
                        "--run-dir", str(tmp_path / "run"), "--steps", "50", "--batch-size", "32",
                        "--summary-every", "0", env={"MULTITOWER_FAULT": "1:3:raise"})
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr  # torchrun's status for a failed worker
    assert last == ("multitower: error: node 1 (198.18.0.101) failed with exit status 1: rank 1 failed: "
                    "InjectedFault: injected fault on rank 1 at step 3 (an internal error; traceback in "
                    f"{tmp_path / 'run' / 'logs' / 'rank-1.log'})"), last
    assert not ours_left()
