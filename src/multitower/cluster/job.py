"""Run one training command as a multi-node job on the emulated cluster (network.py).

Every node runs torch's own launcher inside its namespace, as `torchrun --nnodes N` would on
a real machine (cluster/agent.py: torchrun whose c10d rendezvous also numbers the attempts):

    ip netns exec mt-RID-nI  python -m multitower.cluster.agent --nnodes N[MIN:N] --nproc-per-node P_I
        --rdzv-backend multitower-rounds --rdzv-endpoint 198.18.0.100:29400 --rdzv-id RID
        --rdzv-conf is_host=1|0,join_timeout=120 --local-addr 198.18.0.(100+I)
        --log-dir $TMPDIR/multitower-cluster-RID/nodeI -m multitower train <the user's flags>

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
- --log-dir: the launchers' per-attempt folders (the workers' error.json), removed with the
  network; torch's default is a new /tmp/torchelastic_* per launcher, never removed.
- The user's --workers stays the job's total (as for `multitower train`): the strategies
  check it against WORLD_SIZE (downpour splits roles by it); hogwild never spans nodes.
- --min-nodes MIN: torchrun's elastic range --nnodes MIN:N; a lost node (not node 0, whose
  agent serves the rendezvous) leaves the others to restart from the newest checkpoint.
- Each node's launcher and workers run on its share of the cores (sched_setaffinity before
  exec), and train() divides that share among its local workers.
"""

from __future__ import annotations

import collections
import contextlib
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
from pathlib import Path

from multitower.cluster.network import (MAX_NODES, Network, Node, agent_log_dir, check_rights, describe_rate,
                                        namespace_pids, remove_stale, stop_processes)
from multitower.errors import SIGNAL_CAUSES, UserError
from multitower.procs import process_state

RDZV_PORT = 29400  # torchrun's usual c10d port; free in node 0's new namespace
RDZV_JOIN_TIMEOUT_S = 120  # nodes still missing after this: the job fails (torch's default: 600)
# Elastic jobs: once the fewest nodes allowed have joined a round, how long it waits for more
# (torch's default 30 s is 30 s more of a lost node's downtime; the nodes here start within ~5 s
# of each other, import of torch included, on this 2-core host).
RDZV_LAST_CALL_S = 10
AGENT_BACKEND = "multitower-rounds"  # cluster/agent.py's rendezvous: torch's c10d, numbering the rounds
FAILURE_GRACE_S = 15.0  # after one node fails, the others may take this long to notice and stop
STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL, for the launchers to stop their workers
LINGER_S = 3.0  # a launcher left without workers while the job ends: ~6 monitor intervals of 0.5 s
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
    if workers % (nodes - 1):
        raise UserError(f"--ps-node leaves {nodes - 1} of the --nodes {nodes} to the workers: give --workers a "
                        f"multiple of {nodes - 1}, got {workers}")
    return [workers // (nodes - 1)] * (nodes - 1) + [servers]


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
    from multitower.parallel import processes  # here: it imports torch, which check_rights must precede
    servers = processes(parallel) - parallel.workers  # downpour's parameter servers
    per_node = node_processes(parallel.workers, servers, nodes, ps_node)
    check_elastic(min_nodes or nodes, nodes, per_node, cfg.data.batch_size, parallel.options.get("accumulate", 1),
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
                "--log-dir", str(agent_log_dir(network.run_id) / f"node{node.index}"),
                "-m", "multitower", "train", *train_flags]
        env = {"GLOO_SOCKET_IFNAME": node.interface, "TP_SOCKET_IFNAME": node.interface,
               # TensorPipe (downpour's rpc) over TCP only: the nodes share a kernel (downpour.py)
               "MULTITOWER_NETWORK_ONLY": "1",
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
        # torchrun's report of a worker that died without a word: "rank : 1 (local_rank: 0)"
        # then "exitcode : -9 (pid: 4242)".
        ranks = [m.group(1) for m in map(_REPORTED_RANK.match, lines) if m]
        codes = [(int(m.group(1)), m.group(2)) for m in map(_REPORTED_EXIT.match, lines) if m]
        if ranks and codes:
            code, pid = codes[-1]
            if code < 0:
                name = signal.Signals(-code).name
                return f"rank {ranks[-1]} (pid {pid}) was killed by {name} ({SIGNAL_CAUSES.get(name, 'killed')})"
            return f"rank {ranks[-1]} (pid {pid}) exited with status {code}"
        words = [line for line in lines if line.strip("=-")]  # not the report's rules
        return words[-1] if words else "no output"


# A traceback's last line, "[rank1]: multitower.faults.InjectedFault: ..." (the prefix only
# once the worker joined its process group); torchrun's own ChildFailedError wraps it.
_RAISED = re.compile(r"(?:\[rank(\d+)\]: )?(\w[\w.]*(?:Error|Exception|Fault|Interrupt)): (.*)")
_REPORTED_RANK = re.compile(r"rank\s*:\s*(\d+) \(local_rank")
_REPORTED_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)")
# What a rank reports when another one failed first (as launch.root_failure tells them apart).
_CONSEQUENCES = ("stopped responding", "Connection closed", "Connection reset", "SIGTERM",
                 "lost the launcher's store")
# A verdict's silent rank and its node: "rank 1 (node 1, pid 42) stopped responding" (heartbeat.py).
_SILENT_NODE = re.compile(r"rank \d+ \((?:[^()]*, )?node (\d+), pid \d+\) stopped responding")


def run_job(network: Network, launches: list[NodeLaunch], out=sys.stdout,
            min_nodes: int = 0) -> tuple[int, str | None]:
    """Start every node's launcher, wait for all; (0, None), or the exit status of the node
    that failed first and the failure's one line (failure_line). Elastic (`min_nodes` below the node
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
    stopped: set[int] = set()  # nodes whose launchers we stopped: their failure is ours
    idle_since: dict[int, float] = {}  # launchers without workers, since when
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
                stopped |= {i for i, code in enumerate(codes) if code is None}
                stop_processes([launch.node.namespace for launch in launches], grace_s=STOP_GRACE_S)
            elif ending:
                stopped |= _stop_lingering(launches, agents, idle_since)
            time.sleep(0.2)
    except BaseException:  # interrupted: the caller's teardown stops the nodes
        for output in outputs:
            output.muted = True
        raise
    for output in outputs:
        output.thread.join(timeout=5)
    failed = {i: t for i, t in failed_at.items() if i not in lost or agents[0].returncode != 0}
    if not failed:
        return 0, None
    code = agents[min(failed, key=failed.get)].returncode
    # killed by signal S: 128 + S, as a shell reports it
    return (code if code > 0 else 128 - code), failure_line(launches, agents, outputs, failed, stopped)


def failure_line(launches: list[NodeLaunch], agents, outputs: list[_Output], failed: dict[int, float],
                 stopped: set[int]) -> str:
    """The job's failure in one line. The reporting node: one whose launcher we did not stop,
    then one that failed of itself (its own error, a rank killed) rather than of a peer's
    failure, then node 0 (whose agent serves the store every rank reports to: its view of
    who went silent is first-hand), then the first to fail. When its reason is a verdict on
    a silent rank of another node, that node is named first: after a link is cut each side
    finds the other silent, and node 0's side is the job's."""
    def reason(i: int) -> str:
        if agents[i].returncode < 0 and i not in stopped:
            # Its launcher killed by a signal: nothing on that node could say why.
            return "its launcher was killed with everything on the node (the machine went down?)"
        return outputs[i].reason()

    first = min(failed, key=lambda i: (i in stopped, any(c in reason(i) for c in _CONSEQUENCES), i != 0, failed[i]))
    node, said = launches[first].node, reason(first)
    silent = _SILENT_NODE.search(said)
    if silent and int(silent.group(1)) != first and int(silent.group(1)) < len(launches):
        other = launches[int(silent.group(1))].node
        return f"node {other.index} ({other.address}) stopped responding, as node {node.index} reports: {said}"
    return f"node {node.index} ({node.address}) failed with {_how(agents[first].returncode)}: {said}"


def _stop_lingering(launches: list[NodeLaunch], agents, idle_since: dict[int, float]) -> set[int]:
    """Once the job is ending: SIGKILL what runs on the nodes whose workers have all gone (or
    are frozen, SIGSTOP) for LINGER_S, and return those nodes. torch's agent then only waits
    on node 0's rendezvous store (to shut it down, or for a restart's next round), which a cut
    link leaves out of reach for its read timeout (60 s), or for a frozen worker to handle
    its SIGTERM, which it never will (then 30 s, _stop_workers); nothing is left to stop."""
    killed = set()
    now = time.monotonic()
    for i, (launch, agent) in enumerate(zip(launches, agents)):
        if agent.poll() is not None:
            continue
        pids = namespace_pids(launch.node.namespace)
        if any(process_state(pid) not in ("T", "t", None) for pid in set(pids) - {agent.pid}):
            idle_since.pop(i, None)
        elif now - idle_since.setdefault(i, now) > LINGER_S:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed.add(i)
    return killed


def _how(code: int) -> str:
    """A launcher's exit in words: "exit status 1", or the signal that killed it."""
    return f"exit status {code}" if code > 0 else f"{signal.Signals(-code).name}"


def run_cluster(nodes: int, rate_bps: int | None, train_flags: list[str], per_node: list[int], cores_per_node: int = 0,
                max_restarts: int = 0, min_nodes: int = 0, run_dir: str = "", dry_run: bool = False,
                out=sys.stdout) -> int:
    """The `multitower cluster` command: make the network, run the job (node I starting
    per_node[I] processes, plan_nodes), remove the network whatever happens; a failure is
    one line on stderr, and in `run_dir`'s status where rank 0 could not write it. Returns
    the exit status (128 + signal number when interrupted)."""
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
            code, line = run_job(network, launches, out, min_nodes)
        finally:
            # A signal now would cut the teardown short: it waits until the teardown is done,
            # then raises Interrupted as it is unblocked.
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            try:
                network.teardown()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    except Interrupted as exc:
        message = f"interrupted by {exc}: stopped the job on {nodes} nodes and removed its network"
        print(f"multitower: {message}", file=sys.stderr, flush=True)
        settle_status(run_dir, "interrupted", message)
        return SIGNALS[exc.signum]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if line:
        print(f"multitower: error: {line}", file=sys.stderr, flush=True)
        settle_status(run_dir, "failed", line)
    return code


def settle_status(run_dir: str, state: str, message: str) -> None:
    """The run's final status, with the job's one line, as launch() writes it on one machine:
    rank 0 may have written none (killed, cut off, stopped by its launcher's SIGTERM, or ended
    at once by its heartbeat's verdict, heartbeat.py), its status.json then still saying
    "running", or one with its own side of the story (a collective's timeout)."""
    if not run_dir or not (Path(run_dir) / "config.json").exists():
        return  # the run never started: nothing of it to describe
    from multitower.train.checkpoint import CheckpointDir  # torch: only once the job is over
    from multitower.train.run_dir import RunDirLock, read_status, write_status
    status = read_status(run_dir) or {}
    try:
        with RunDirLock(run_dir):
            latest = CheckpointDir(Path(run_dir) / "checkpoints").latest_step()
            write_status(run_dir, state, int(status.get("step", 0)), latest, message)
    except (UserError, OSError):
        pass  # another writer took the run meanwhile, or its disk is gone: nothing true to add
