"""The emulated cluster's network: one Linux network namespace per node, joined by a switch.

Layout of a cluster with run id RID (8 hex digits) and N nodes:

    namespace mt-RID-sw   bridge br0, and one veth end nI per node (the switch's ports)
    namespace mt-RID-nI   the other end, named eth0, address 198.18.0.(100+I)/24, and lo;
                          its /etc/hosts (/etc/netns/mt-RID-nI/hosts) names the nodes

Every link is made directly between two of these namespaces (`ip -n SW link add nI type
veth peer name eth0 netns NODE`), so nothing ever appears in the host's own namespace,
and deleting the namespaces (after their processes) removes every interface. The
addresses come from 198.18.0.0/15, the range reserved for network benchmarks (RFC 2544);
each cluster has a switch of its own, so concurrent clusters reuse the same addresses
without ever reaching each other, and the host has no route to any of them.

Shaping: a token-bucket filter (tc tbf) on both ends of each node's link, the node's eth0
(what it sends) and the switch's nI (what it receives). tbf limits bandwidth only;
latency and loss need netem, which this kernel lacks (docs/cluster.md).

Ownership: the creating process holds an flock on /run/multitower/cluster-RID.lock for
the cluster's whole life. The kernel drops the lock when that process dies, even by
SIGKILL, so a later `remove_stale()` can tell a live cluster (lock held: left alone) from
the leftovers of a killed one (lock free: its processes killed, its namespaces deleted).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from multitower.errors import UserError

PREFIX = "mt-"
LOCK_DIR = Path("/run/multitower")  # tmpfs, like /run/netns: both are gone after a reboot
# `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts (ip-netns(8)).
ETC_NETNS = Path("/etc/netns")
INTERFACE = "eth0"  # the node's side of its link; the same name in every node's namespace
ADDRESS_BASE = 100  # node I is 198.18.0.(100 + I): equal-length addresses, see address_of
MAX_NODES = 64  # addresses allow 155; a node runs a launcher (~0.2 GB resident) and workers (~0.4 GB each)
_NAME = re.compile(rf"^{PREFIX}([0-9a-f]{{8}})-(sw|n\d+)$")
_COMMAND_TIMEOUT_S = 30  # one ip/tc call; they take milliseconds


def address_of(index: int) -> str:
    """Node `index`'s address. torch's c10d rendezvous numbers nodes by sorting their
    --local-addr strings, so every address has three digits in its last byte: string
    order is then node order, and node 0 is group rank 0 (global ranks 0 .. W-1)."""
    return f"198.18.0.{ADDRESS_BASE + index}"


# -- rates -----------------------------------------------------------------------------

# tc's rate units (tc(8), "RATES"): bits per second, SI and IEC prefixes, and the byte
# forms, where tc's "mbps" means megaBYTES per second.
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12,
          "kibps": 8 * 2**10, "mibps": 8 * 2**20, "gibps": 8 * 2**30, "tibps": 8 * 2**40}
UNSHAPED = ("unshaped", "none")
MIN_RATE_BPS, MAX_RATE_BPS = 1e6, 100e9  # below 1 Mbit/s a training step takes minutes; veth tops out well below 100


def parse_rate(text: str) -> int | None:
    """Bits per second of a tc-style rate ("1gbit", "50mbit", "200mbit"), or None for
    "unshaped"/"none". A bad rate is a one-line UserError."""
    spec = text.strip().lower()
    if spec in UNSHAPED:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]+)", spec)
    if not match or match.group(2) not in _UNITS:
        raise UserError(f"--link {text!r} is not a rate: give a number and a tc unit, e.g. 1gbit, 200mbit, "
                        f"50mbit (or unshaped)")
    bps = float(match.group(1)) * _UNITS[match.group(2)]
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise UserError(f"--link {text} is {bps / 1e6:g} Mbit/s; give a rate from 1mbit to 100gbit (or unshaped)")
    return int(bps)


def describe_rate(bps: int | None) -> str:
    if bps is None:
        return "unshaped"
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"


def tbf_parameters(bps: int) -> tuple[int, int]:
    """(burst, limit) in bytes for a tbf at `bps`.
    burst: the bucket. It must hold the largest packet the qdisc sees, and veth hands it
    GSO packets of up to 64 KiB; tbf would split larger ones segment by segment. So 1 ms at
    the rate (125 KB at 1 Gbit/s), at least 64 KiB (10 ms at 50 Mbit/s).
    limit: bytes that may queue behind the bucket before tbf drops; 50 ms at the rate
    (6.25 MB at 1 Gbit/s, 312 KB at 50 Mbit/s), as a switch port's buffer would. A shorter
    queue drops TCP's bursts and the link then carries less than its rate; a longer one
    only adds queueing delay."""
    bytes_per_s = bps / 8
    burst = max(64 * 1024, int(bytes_per_s * 0.001))
    limit = burst + int(bytes_per_s * 0.050)
    return burst, limit


# -- rights ------------------------------------------------------------------------------

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21  # linux/capability.h
NEEDS = ("multitower cluster needs root (CAP_SYS_ADMIN to make network namespaces, CAP_NET_ADMIN for "
         "their links and tc): run it as root or with sudo")


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_rights() -> None:
    """A one-line UserError unless this process can make namespaces and shape links."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"multitower cluster needs {' and '.join(missing)} (Debian: apt-get install iproute2)")
    caps = effective_capabilities()
    if not (caps >> CAP_NET_ADMIN & 1 and caps >> CAP_SYS_ADMIN & 1):
        raise UserError(NEEDS)


def _run(*argv: str) -> None:
    """One ip/tc command; its failure is a one-line UserError quoting the tool."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        hint = f"; {NEEDS}" if "permission" in said.lower() or "not permitted" in said.lower() else ""
        raise UserError(f"`{' '.join(argv)}` failed: {said}{hint}")


def _namespaces() -> list[str]:
    """Every namespace `ip netns` knows, and every /etc/netns folder (ours may outlive theirs)."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    names = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    if ETC_NETNS.is_dir():
        names |= {path.name for path in ETC_NETNS.iterdir() if _NAME.match(path.name)}
    return sorted(names)


def namespace_pids(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                          timeout=_COMMAND_TIMEOUT_S)
    return [int(pid) for pid in done.stdout.split()]


def stop_processes(namespaces: list[str], grace_s: float) -> None:
    """SIGTERM every process inside `namespaces` (all of them started by the cluster), then
    SIGKILL those still there after `grace_s`; return once none is left (or after 10 s more)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        pids = [pid for ns in namespaces for pid in namespace_pids(ns)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(namespace_pids(ns) for ns in namespaces):
            time.sleep(0.1)


def _delete_namespaces(namespaces: list[str], grace_s: float) -> None:
    stop_processes(namespaces, grace_s)
    for ns in namespaces:
        # Its veth ends go with it, and the peer ends with them.
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=_COMMAND_TIMEOUT_S)
        if _NAME.match(ns):  # never another program's /etc/netns folder
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def _lock_path(run_id: str) -> Path:
    return LOCK_DIR / f"cluster-{run_id}.lock"


def agent_log_dir(run_id: str) -> Path:
    """Where the nodes' launchers keep their per-attempt folders (torchrun's --log-dir: the
    workers' error.json files). Without one, torch makes a /tmp/torchelastic_* for every
    launcher and never removes it; this one goes with the cluster's namespaces."""
    return Path(tempfile.gettempdir()) / f"multitower-cluster-{run_id}"


def _owner_is_gone(run_id: str) -> tuple[bool, int | None]:
    """(whether nobody holds run_id's lock, the fd now holding it for us, if we took it)."""
    try:
        fd = os.open(_lock_path(run_id), os.O_RDWR)
    except FileNotFoundError:
        return True, None  # never made, or its owner removed it after (or while) tearing down
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    return True, fd


def _remove_if_unlocked(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def _remove_empty_folders() -> None:
    """/run/multitower and /etc/netns, once no cluster uses them: they were made for ours.
    A cluster starting meanwhile makes them again (see _take_lock)."""
    for folder in (LOCK_DIR, ETC_NETNS):
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            pass


def remove_stale() -> list[str]:
    """Remove what killed clusters left: the namespaces (with their processes) and lock
    files of every run id whose owner no longer holds its lock. Live clusters, this
    process's and others', are left alone. Returns the namespaces removed."""
    by_run: dict[str, list[str]] = {}
    for ns in _namespaces():
        match = _NAME.match(ns)
        if match:
            by_run.setdefault(match.group(1), []).append(ns)
    if LOCK_DIR.is_dir():
        for path in LOCK_DIR.glob("cluster-*.lock"):
            by_run.setdefault(path.stem.removeprefix("cluster-"), [])
        for path in LOCK_DIR.glob(".cluster-*.lock.*"):  # an owner killed before renaming its lock
            _remove_if_unlocked(path)
    removed = []
    for run_id, namespaces in sorted(by_run.items()):
        gone, fd = _owner_is_gone(run_id)
        if not gone:
            continue
        try:
            _delete_namespaces(namespaces, grace_s=0.0)  # a dead run's processes have nobody to report to
            shutil.rmtree(agent_log_dir(run_id), ignore_errors=True)
            removed += namespaces
            _lock_path(run_id).unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    _remove_empty_folders()
    return removed


@dataclass(frozen=True)
class Node:
    index: int
    namespace: str
    address: str
    interface: str = INTERFACE


class Network:
    """N nodes on one switch, each link shaped to rate_bps (None: unshaped). Use as a
    context manager, or call create() and teardown(); teardown is safe to call twice."""

    def __init__(self, nodes: int, rate_bps: int | None, run_id: str | None = None):
        if not 1 <= nodes <= MAX_NODES:
            raise UserError(f"--nodes must be from 1 to {MAX_NODES}, got {nodes}")
        self.run_id = run_id or secrets.token_hex(4)
        if not re.fullmatch(r"[0-9a-f]{8}", self.run_id):
            raise UserError(f"a cluster run id is 8 hex digits, got {self.run_id!r}")
        self.rate_bps = rate_bps
        self.switch = f"{PREFIX}{self.run_id}-sw"
        self.nodes = [Node(i, f"{PREFIX}{self.run_id}-n{i}", address_of(i)) for i in range(nodes)]
        self._lock_fd: int | None = None

    @property
    def namespaces(self) -> list[str]:
        return [node.namespace for node in self.nodes] + [self.switch]

    def create(self) -> "Network":
        check_rights()
        self._take_lock()
        try:
            _run("ip", "netns", "add", self.switch)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for node in self.nodes:
                port = f"n{node.index}"  # the switch's end of this node's link
                _run("ip", "netns", "add", node.namespace)
                _run("ip", "-n", self.switch, "link", "add", port, "type", "veth",
                     "peer", "name", node.interface, "netns", node.namespace)
                _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
                _run("ip", "-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.interface)
                _run("ip", "-n", node.namespace, "link", "set", node.interface, "up")
                _run("ip", "-n", node.namespace, "link", "set", "lo", "up")  # the node's own loopback
                self._write_hosts(node)
                if self.rate_bps is not None:
                    self._shape(node.namespace, node.interface)  # what the node sends
                    self._shape(self.switch, port)  # what it receives
        except BaseException:
            self.teardown()
            raise
        return self

    def _write_hosts(self, node: Node) -> None:
        """The node's /etc/hosts: every node by name (nodeI), and the host's name as this
        node's own address, as a real machine's name is its own. Without it torch's
        c10d sockets look up their peers' names, wait for DNS that is not there, and warn
        "The hostname of the client socket cannot be retrieved"."""
        lines = ["127.0.0.1 localhost"]
        for other in self.nodes:
            names = f"node{other.index}" + (f" {socket.gethostname()}" if other is node else "")
            lines.append(f"{other.address} {names}")
        # TCPStore's server listens on IPv6 and sees its IPv4 clients as ::ffff:a.b.c.d,
        # which glibc looks up as such: without these lines, the same warning.
        lines += [f"::ffff:{other.address} node{other.index}" for other in self.nodes]
        folder = ETC_NETNS / node.namespace
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def _shape(self, namespace: str, device: str) -> None:
        burst, limit = tbf_parameters(self.rate_bps)
        _run("tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf",
             "rate", f"{self.rate_bps}bit", "burst", str(burst), "limit", str(limit))

    def _take_lock(self) -> None:
        """Hold this run's lock before any namespace exists. The file is locked under a
        temporary name and then renamed into place, so that remove_stale() can never find
        it unlocked while this cluster lives."""
        final = _lock_path(self.run_id)
        temporary = final.with_name(f".{final.name}.{os.getpid()}")
        for attempt in range(3):  # another cluster's teardown may remove the empty folder meanwhile
            LOCK_DIR.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": os.getpid(), "namespaces": self.namespaces}).encode())
        os.rename(temporary, final)
        self._lock_fd = fd

    def teardown(self, grace_s: float = 10.0) -> None:
        """Stop every process in the cluster's namespaces (SIGTERM; SIGKILL after grace_s:
        time for a launcher to stop its workers), delete them and the launchers' log folder,
        release the lock."""
        if self._lock_fd is None:
            return
        try:
            existing = set(_namespaces())
            _delete_namespaces([ns for ns in self.namespaces if ns in existing], grace_s)
            shutil.rmtree(agent_log_dir(self.run_id), ignore_errors=True)
            _lock_path(self.run_id).unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None
        _remove_empty_folders()

    def __enter__(self) -> "Network":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.teardown()

    def describe(self) -> str:
        rate = describe_rate(self.rate_bps)
        lines = [f"switch: namespace {self.switch}, bridge br0; each link {rate} both ways (tc tbf)"]
        lines += [f"node {n.index}: namespace {n.namespace}, {n.interface} {n.address}/24" for n in self.nodes]
        return "\n".join(lines)
