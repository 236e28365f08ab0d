"""Run one training command as a multi-node job on the emulated cluster (network.py).

Every node runs torch's own launcher inside its namespace, as `torchrun --nnodes N` would on
a real machine (cluster/agent.py: torchrun whose c10d rendezvous also numbers the attempts):

    ip netns exec mt-RID-nI  python -m multitower.cluster.agent --nnodes N[MIN:N] --nproc-per-node P_I
        --rdzv-backend multitower-rounds --rdzv-endpoint 198.18.0.100:29400 --rdzv-id RID
        --rdzv-conf is_host=1|0,join_timeout=120 --local-addr 198.18.0.(100+I)
        -m multitower train <the user's flags>

- --local-addr: the namespaces share the host's name (one UTS namespace), so without it every
  agent would call itself by the host's name, which resolves to no address of the cluster.
  With it the agent of node I is "198.18.0.(100+I)"; c10d's rendezvous sorts the agents by
  that string (dynamic_rendezvous.py, _mark_rendezvous_complete: enumerate(sorted(
  participants)), a participant being (addr, pid, local_id)), so node I is group rank I and
  runs the global ranks after those of nodes 0..I-1; node 0 holds rank 0, which writes the run
  dir. P_I is P/N, except with --ps-node: downpour's servers, the last ranks, on the last node.
- is_host: c10d guesses which agent serves the rendezvous store by comparing the endpoint
  with the host's name and addresses, which in a namespace match nothing; node 0 is told.
- GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME = eth0: gloo and TensorPipe (downpour's rpc) pick
  their address from the host name as well; named, they take the node's own interface.
- The user's --workers stays the job's total (as for `multitower train`): the strategies
  check it against WORLD_SIZE (downpour splits roles by it); hogwild never spans nodes.
- --min-nodes MIN: torchrun's elastic range --nnodes MIN:N; a lost node (not node 0, whose
  agent serves the rendezvous) leaves the others to restart from the newest checkpoint.
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
# Elastic jobs: once the fewest nodes allowed have joined a round, how long it waits for more
# (torch's default 30 s is 30 s more of a lost node's downtime; the nodes here start within ~5 s
# of each other, import of torch included, on this 2-core host).
RDZV_LAST_CALL_S = 10
AGENT_BACKEND = "multitower-rounds"  # cluster/agent.py's rendezvous: torch's c10d, numbering the rounds
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


def node_processes(workers: int, servers: int, nodes: int, ps_node: bool = False) -> list[int]:
    """Processes each node starts, in node order: the job's workers + servers divided evenly;
    with `ps_node`, downpour's `servers` all on the last node and the workers divided among
    the others. Node I runs the global ranks that follow those of nodes 0..I-1 (c10d numbers
    the nodes by address, the agents their workers in that order), so the last node holds
    ranks W..W+P-1: the servers (parallel/downpour.py)."""
    if not ps_node:
        return [processes_per_node(workers + servers, nodes)] * nodes
    if not servers:
        raise UserError("--ps-node puts downpour's parameter servers on a node of their own; "
                        "give the training command --strategy downpour (or drop --ps-node)")
    if nodes < 2:
        raise UserError(f"--ps-node needs --nodes 2 or more (the workers' nodes and one for the servers), got {nodes}")
    return [processes_per_node(workers, nodes - 1)] * (nodes - 1) + [servers]


def check_elastic(min_nodes: int, nodes: int, per_node: list[int], batch_size: int, accumulate: int,
                  max_restarts: int, strategy: str) -> None:
    """One-line UserError unless a job may go on with min_nodes .. nodes of its nodes."""
    if not 1 <= min_nodes <= nodes:
        raise UserError(f"--min-nodes must be from 1 to --nodes {nodes}, got {min_nodes}")
    if min_nodes == nodes:
        return
    if strategy in ("downpour", "hogwild"):
        raise UserError(f"--min-nodes {min_nodes} lets the job go on with fewer nodes, but --strategy {strategy} "
                        f"needs all of its processes; use sync, local-sgd or pipeline, or drop --min-nodes")
    if max_restarts < 1:
        raise UserError(f"--min-nodes {min_nodes} needs --max-restarts 1 or more in the training command: the "
                        f"nodes left restart their workers from the newest checkpoint")
    for n in range(min_nodes, nodes):
        if batch_size % (n * per_node[0] * accumulate):
            raise UserError(f"--batch-size {batch_size} cannot be divided among the {n * per_node[0]} workers of "
                            f"{n} nodes (--min-nodes {min_nodes}); give a batch divisible by each possible count")


def plan_nodes(cfg, nodes: int, ps_node: bool = False, min_nodes: int = 0) -> list[int]:
    """Processes per node for the train command's Config (node_processes), after the checks a
    multi-node job needs, each a one-line UserError: hogwild never spans nodes, --ps-node
    only with downpour, an elastic range only where the job can go on with fewer nodes."""
    parallel = cfg.parallel
    if parallel.strategy == "hogwild" and nodes > 1:
        raise UserError(f"--strategy hogwild shares one machine's memory between its workers and cannot span "
                        f"--nodes {nodes}; use sync or local-sgd across nodes, or --nodes 1")
    servers = parallel.ps if parallel.strategy == "downpour" else 0
    per_node = node_processes(parallel.workers, servers, nodes, ps_node)
    check_elastic(min_nodes or nodes, nodes, per_node, cfg.data.batch_size, parallel.accumulate,
                  parallel.max_restarts, parallel.strategy)
    return per_node


def plan_launches(network: Network, train_flags: list[str], per_node: list[int], cores_per_node: int = 0,
                  max_restarts: int = 0, min_nodes: int = 0) -> list[NodeLaunch]:
    """One launcher command per node for `multitower train <train_flags>`, node I starting
    per_node[I] processes (node_processes); `min_nodes` below the node count: an elastic
    job (torchrun's --nnodes MIN:MAX) that goes on when nodes are lost."""
    nodes = len(network.nodes)
    shares = divide_cores(nodes, cores_per_node, sorted(os.sched_getaffinity(0)))
    endpoint = f"{network.nodes[0].address}:{RDZV_PORT}"
    nnodes = str(nodes) if not min_nodes or min_nodes == nodes else f"{min_nodes}:{nodes}"
    launches = []
    for node, cores, processes in zip(network.nodes, shares, per_node):
        conf = f"is_host={int(node.index == 0)},join_timeout={RDZV_JOIN_TIMEOUT_S}"
        if nnodes != str(nodes):
            conf += f",last_call_timeout={RDZV_LAST_CALL_S}"
        argv = [sys.executable, "-m", "multitower.cluster.agent", "--nnodes", nnodes,
                "--nproc-per-node", str(processes), "--rdzv-backend", AGENT_BACKEND, "--rdzv-endpoint", endpoint,
                "--rdzv-id", network.run_id, "--rdzv-conf", conf,
                "--local-addr", node.address, "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
                "-m", "multitower", "train", *train_flags]
        env = {"GLOO_SOCKET_IFNAME": node.interface, "TP_SOCKET_IFNAME": node.interface,
               # torchrun sets 1 (and warns) when unset; train() sets its own count anyway
               "OMP_NUM_THREADS": str(max(1, len(cores) // processes)), "PYTHONUNBUFFERED": "1"}
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


def run_job(network: Network, launches: list[NodeLaunch], out=sys.stdout, min_nodes: int = 0) -> int:
    """Start every node's launcher, wait for all; 0, or the exit status of the node that
    failed first (after one line naming it on stderr). Elastic (`min_nodes` below the node
    count): a node other than node 0 (whose agent serves the rendezvous) may be lost while
    at least `min_nodes` remain: said in one line, and the others go on without it."""
    elastic = 0 < min_nodes < len(launches)
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
    lost: set[int] = set()  # elastic: nodes the job went on without
    try:
        while True:
            codes = [agent.poll() for agent in agents]
            for i, code in enumerate(codes):
                if code not in (None, 0) and i not in failed_at:
                    failed_at[i] = time.monotonic()
                    left = sum(c is None for c in codes)
                    if elastic and i != 0 and left >= min_nodes:
                        lost.add(i)
                        node = launches[i].node
                        with lock:
                            print(f"[cluster] node {i} ({node.address}) is lost ({_how(code)}): the job goes on "
                                  f"with the {left} node(s) left", file=out, flush=True)
            if all(code is not None for code in codes):
                break
            ending = [t for i, t in failed_at.items() if i not in lost]
            if ending and time.monotonic() - min(ending) > FAILURE_GRACE_S:
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
    failed = {i: t for i, t in failed_at.items() if i not in lost or agents[0].returncode != 0}
    if not failed:
        return 0
    # The node that failed of itself, not of a peer's failure, and among those the first.
    first = min(failed, key=lambda i: (any(c in outputs[i].reason() for c in _CONSEQUENCES), failed[i]))
    node, code = launches[first].node, agents[first].returncode
    print(f"multitower: error: node {node.index} ({node.address}) failed with {_how(code)}: {outputs[first].reason()}",
          file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code  # killed by signal S: 128 + S, as a shell reports it


def _how(code: int) -> str:
    """A launcher's exit in words: "exit status 1", or the signal that killed it."""
    return f"exit status {code}" if code > 0 else f"{signal.Signals(-code).name}"


def run_cluster(nodes: int, rate_bps: int | None, train_flags: list[str], per_node: list[int], cores_per_node: int = 0,
                max_restarts: int = 0, min_nodes: int = 0, dry_run: bool = False, out=sys.stdout) -> int:
    """The `multitower cluster` command: make the network, run the job (node I starting
    per_node[I] processes, plan_nodes), remove the network whatever happens. Returns the
    exit status (128 + signal number when interrupted)."""
    network = Network(nodes, rate_bps)
    launches = plan_launches(network, train_flags, per_node, cores_per_node, max_restarts, min_nodes)
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
            return run_job(network, launches, out, min_nodes)
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
