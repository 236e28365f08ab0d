"""The emulated cluster's network: nodes in network namespaces on one host.

Plumbing: namespaces, switch, tc shaping measured over TCP, teardown, leftovers of a
killed run. Tests that make namespaces need root (CAP_SYS_ADMIN and
CAP_NET_ADMIN) and are skipped, with the reason, where namespaces cannot be made.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from multitower.cluster import network
from multitower.cluster.network import Network, check_rights, parse_rate, remove_stale, tbf_parameters
from multitower.errors import UserError


@pytest.fixture(scope="session")
def namespaces():
    """Skip unless this process can make (and remove) a network namespace."""
    try:
        check_rights()
        Network(1, None).create().teardown()
    except (UserError, OSError) as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc}")


def ours_left() -> list[str]:
    """Namespaces, /etc/netns folders and lock files of any cluster, in the host."""
    names = [ns for ns in network._namespaces() if ns.startswith(network.PREFIX)]
    locks = [p.name for p in network.LOCK_DIR.glob("*cluster-*")] if network.LOCK_DIR.is_dir() else []
    return names + locks


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for init to reap it)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def host_links() -> list[str]:
    return sorted(line.split(":")[1].strip() for line in
                  subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines())


# -- rates and rights: no root needed --------------------------------------------------

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


def test_tbf_burst_holds_a_gso_packet_and_the_queue_50_ms():
    burst, limit = tbf_parameters(50 * 10**6)
    assert burst == 64 * 1024 and limit == burst + 312_500
    burst, limit = tbf_parameters(10**9)
    assert burst == 125_000 and limit == burst + 6_250_000


def test_without_the_capabilities_it_says_what_is_needed(monkeypatch):
    monkeypatch.setattr(network, "effective_capabilities", lambda: 0)
    with pytest.raises(UserError, match="needs root .*CAP_SYS_ADMIN.*CAP_NET_ADMIN"):
        check_rights()


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
from multitower.cluster.network import Network
net = Network(2, None, run_id=sys.argv[1]).create()
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
    finally:
        live.teardown()
    assert not [name for name in ours_left() if live.run_id in name]
