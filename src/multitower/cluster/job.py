"""Run one training command as a multi-node job on the emulated cluster (network.py).

Every node runs torch's own launcher inside its namespace, as `torchrun --nnodes N` would on
a real machine:

    ip netns exec mt-RID-nI  python -m torch.distributed.run --nnodes N --nproc-per-node P/N
        --rdzv-backend c10d --rdzv-endpoint 198.18.0.100:29400 --rdzv-id RID
        --rdzv-conf is_host=1|0,join_timeout=120 --local-addr 198.18.0.(100+I)
        -m multitower train <the user's flags>

- --local-addr: the namespaces share the host's name (one UTS namespace), so without it every
  agent would call itself by the host's name, which resolves to no address of the cluster.
  With it the agent of node I is "198.18.0.(100+I)"; c10d's rendezvous sorts the agents by
  that string (dynamic_rendezvous.py, _mark_rendezvous_complete: enumerate(sorted(
  participants)), a participant being (addr, pid, local_id)), so node I is group rank I and
  runs global ranks I*P/N .. (I+1)*P/N - 1; node 0 holds rank 0, which writes the run dir.
- is_host: c10d guesses which agent serves the rendezvous store by comparing the endpoint
  with the host's name and addresses, which in a namespace match nothing; node 0 is told.
- GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME = eth0: gloo and TensorPipe (downpour's rpc) pick
  their address from the host name as well; named, they take the node's own interface.
- The user's --workers stays the job's total (as for `multitower train`): the strategies
  check it against WORLD_SIZE (downpour splits roles by it); each node starts P/N processes.
- Each node's launcher and workers run on its share of the cores (sched_setaffinity before
  exec), and train() divides that share among its local workers.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from multitower.cluster.network import (MAX_NODES, Network, Node, check_rights, describe_rate, remove_stale,
                                        stop_processes)
from multitower.errors import UserError

RDZV_PORT = 29400  # torchrun's usual c10d port; free in node 0's new namespace
RDZV_JOIN_TIMEOUT_S = 120  # nodes still missing after this: the job fails (torch's default: 600)
FAILURE_GRACE_S = 15.0  # after one node fails, the others may take this long to notice and stop
STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL, for the launchers to stop their workers
SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}  # exit status 128 + number
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class NodeLaunch:
    node: Node
    cores: list[int]
    argv: list[str]
    env: dict[str, str]  # set on top of this process's environment

    def describe(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (f"node {self.node.index} ({self.node.address}, cores {','.join(map(str, self.cores))}): "
                f"ip netns exec {self.node.namespace} env {env} {shlex.join(self.argv)}")


def processes_per_node(processes: int, nodes: int) -> int:
    if not 1 <= nodes <= MAX_NODES:
        raise UserError(f"--nodes must be from 1 to {MAX_NODES}, got {nodes}")
    if processes % nodes:
        raise UserError(f"the job's {processes} processes cannot be divided among --nodes {nodes}: "
                        f"give --workers (plus --ps) a multiple of {nodes}")
    return processes // nodes


def divide_cores(nodes: int, cores_per_node: int, available: list[int]) -> list[list[int]]:
    """Each node's cores: consecutive shares of `available`; with more nodes than cores they
    wrap around and nodes share (2 cores, 4 nodes: 0, 1, 0, 1)."""
    per_node = cores_per_node or max(1, len(available) // nodes)
    if per_node > len(available):
        raise UserError(f"--cores-per-node {per_node} is more than this process's {len(available)} cores")
    return [[available[(i * per_node + j) % len(available)] for j in range(per_node)] for i in range(nodes)]


def plan_launches(network: Network, train_flags: list[str], processes: int, cores_per_node: int = 0,
                  max_restarts: int = 0) -> list[NodeLaunch]:
    """One launcher command per node for `multitower train <train_flags>` with `processes`
    processes in all (the workers, plus downpour's servers)."""
    nodes = len(network.nodes)
    per_node = processes_per_node(processes, nodes)
    shares = divide_cores(nodes, cores_per_node, sorted(os.sched_getaffinity(0)))
    endpoint = f"{network.nodes[0].address}:{RDZV_PORT}"
    launches = []
    for node, cores in zip(network.nodes, shares):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                "--nproc-per-node", str(per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                "--rdzv-id", network.run_id,
                "--rdzv-conf", f"is_host={int(node.index == 0)},join_timeout={RDZV_JOIN_TIMEOUT_S}",
                "--local-addr", node.address, "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
                "-m", "multitower", "train", *train_flags]
        env = {"GLOO_SOCKET_IFNAME": node.interface, "TP_SOCKET_IFNAME": node.interface,
               # torchrun sets 1 (and warns) when unset; train() sets its own count anyway
               "OMP_NUM_THREADS": str(max(1, len(cores) // per_node)), "PYTHONUNBUFFERED": "1"}
        launches.append(NodeLaunch(node, cores, argv, env))
    return launches


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    # Teardown must finish: further signals are ignored from here on (it is bounded in time).
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _preparer(cores: list[int]):
    """Runs in the child between fork and exec: pin it to its cores, and have the kernel
    SIGTERM it should this process die (even by SIGKILL), so no launcher outlives us."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: nothing to load in the child

    def prepare():
        os.sched_setaffinity(0, cores)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return prepare


class _Output:
    """Copies one node's output to ours, each line prefixed, and keeps its last lines."""

    def __init__(self, index: int, stream, lock: threading.Lock, out):
        self.index, self.stream, self.lock, self.out = index, stream, lock, out
        self.tail: collections.deque[str] = collections.deque(maxlen=200)  # a traceback and torchrun's report
        self.muted = False  # once we stop the nodes: their launchers' shutdown tracebacks are noise
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self):
        for line in self.stream:
            line = line.rstrip("\n")
            self.tail.append(line)
            if self.muted:
                continue
            with self.lock:
                print(f"[node {self.index}] {line}", file=self.out, flush=True)

    def reason(self) -> str:
        """The failure's one line: our train's own error line, else the exception a worker
        raised (torch prefixes a worker's traceback with "[rankN]: "), else the last line."""
        lines = [line.strip() for line in self.tail if line.strip()]
        ours = [line for line in lines if line.startswith("multitower: error: ")]
        if ours:
            return ours[-1].removeprefix("multitower: error: ")
        raised = [m for m in map(_RAISED.match, lines) if m and not m.group(2).endswith("ChildFailedError")]
        if raised:
            rank, name, message = raised[-1].groups()
            return f"{f'rank {rank} ' if rank else ''}raised {name.rsplit('.', 1)[-1]}: {message}"
        return lines[-1] if lines else "no output"


# A traceback's last line, "[rank1]: multitower.faults.InjectedFault: ..." (the prefix only
# once the worker joined its process group); torchrun's own ChildFailedError wraps it.
_RAISED = re.compile(r"(?:\[rank(\d+)\]: )?(\w[\w.]*(?:Error|Exception|Fault|Interrupt)): (.*)")
# What a rank reports when another one failed first (as launch.root_failure tells them apart).
_CONSEQUENCES = ("stopped responding", "Connection closed", "Connection reset", "SIGTERM")


def run_job(network: Network, launches: list[NodeLaunch], out=sys.stdout) -> int:
    """Start every node's launcher, wait for all; 0, or the exit status of the node that
    failed first (after one line naming it on stderr)."""
    lock = threading.Lock()
    agents = []
    for launch in launches:  # every child forked before any copying thread starts
        agents.append(subprocess.Popen(
            ["ip", "netns", "exec", launch.node.namespace, *launch.argv], env={**os.environ, **launch.env},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # Ctrl-C reaches us alone; we stop the nodes in order
            preexec_fn=_preparer(launch.cores)))
    outputs = [_Output(launch.node.index, agent.stdout, lock, out) for launch, agent in zip(launches, agents)]
    failed_at: dict[int, float] = {}
    try:
        while True:
            codes = [agent.poll() for agent in agents]
            for i, code in enumerate(codes):
                if code not in (None, 0) and i not in failed_at:
                    failed_at[i] = time.monotonic()
            if all(code is not None for code in codes):
                break
            if failed_at and time.monotonic() - min(failed_at.values()) > FAILURE_GRACE_S:
                for output in outputs:
                    output.muted = True
                stop_processes([launch.node.namespace for launch in launches], grace_s=STOP_GRACE_S)
            time.sleep(0.2)
    except BaseException:  # interrupted: the caller's teardown stops the nodes
        for output in outputs:
            output.muted = True
        raise
    for output in outputs:
        output.thread.join(timeout=5)
    if not failed_at:
        return 0
    # The node that failed of itself, not of a peer's failure, and among those the first.
    first = min(failed_at, key=lambda i: (any(c in outputs[i].reason() for c in _CONSEQUENCES), failed_at[i]))
    node, code = launches[first].node, agents[first].returncode
    how = f"exit status {code}" if code > 0 else f"{signal.Signals(-code).name}"
    print(f"multitower: error: node {node.index} ({node.address}) failed with {how}: {outputs[first].reason()}",
          file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code  # killed by signal S: 128 + S, as a shell reports it


def run_cluster(nodes: int, rate_bps: int | None, train_flags: list[str], processes: int, cores_per_node: int = 0,
                max_restarts: int = 0, dry_run: bool = False, out=sys.stdout) -> int:
    """The `multitower cluster` command: make the network, run the job, remove the network
    whatever happens. Returns the exit status (128 + signal number when interrupted)."""
    network = Network(nodes, rate_bps)
    launches = plan_launches(network, train_flags, processes, cores_per_node, max_restarts)
    if dry_run:
        print(f"dry run, nothing made or started:\n{network.describe()}", file=out)
        for launch in launches:
            print(launch.describe(), file=out)
        return 0
    check_rights()
    previous = {sig: signal.signal(sig, _interrupt) for sig in SIGNALS}
    try:
        try:
            removed = remove_stale()
            if removed:
                print(f"removed what a killed cluster left: {', '.join(removed)}", file=out, flush=True)
            network.create()
            print(f"cluster {network.run_id}: {nodes} nodes on one switch, links {describe_rate(rate_bps)}, "
                  f"rendezvous {network.nodes[0].address}:{RDZV_PORT}", file=out, flush=True)
            return run_job(network, launches, out)
        finally:
            # A signal now would cut the teardown short: it waits until the teardown is done,
            # then raises Interrupted as it is unblocked.
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            try:
                network.teardown()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    except Interrupted as exc:
        print(f"multitower: interrupted by {exc}: stopped the job on {nodes} nodes and removed its network",
              file=sys.stderr, flush=True)
        return SIGNALS[exc.signum]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
