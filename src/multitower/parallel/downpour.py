"""Downpour SGD (Dean et al. 2012, "Large Scale Distributed Deep Networks", section 4.1,
https://research.google/pubs/large-scale-distributed-deep-networks/): asynchronous
data parallelism around sharded parameter servers, on torch.distributed.rpc.

Roles. The launcher starts --workers trainers and --ps parameter servers: global
ranks 0..W-1 train (rank 0 is the first worker, is_rank0, and writes the run), ranks
W..W+P-1 serve. The role is decided where the process starts (Downpour.serves): a
server never enters the training loop; Downpour.serve is its whole life, which returns
once every worker has shut down.

Parameters. Each server owns whole parameter tensors, packed largest first onto the
least-loaded server (balance_shards). It applies every push the moment it arrives,
with plain SGD or Adagrad (the paper's choice), holding its lock for the whole
read-modify-write: gradients are received first and applied under the lock, and a
fetch copies the shard under the same lock, so no update is lost or seen half-done.

Workers (the paper's Downpour client). Each trains a replica on its own data shard (its
rank slice of every global batch) and steps it locally with the loop's optimizer,
while summing its gradients; every --n-push steps it sends that sum, with its current
learning rate, to every server; every --n-fetch steps it fetches the servers' shards.
A push does not wait: at most one is in flight, and the next waits for it. A fetch is
sent after the step and applied before the next one (when both are due, one message
does both, so the fetched shard includes this worker's own push). No worker ever
waits for another worker: a slow one only makes its own pushes arrive later.

Staleness: the server updates between a worker's fetch of a shard and the arrival of
its next push to it (both counted by the server), averaged over the shards; the
strategy reports it in StepMetrics.extra["staleness"] whenever a push is answered.

Checkpoints gather the shards from the servers one at a time (each shard consistent,
the set not: others keep pushing meanwhile) into the usual {"model", "optimizer"}
format, "optimizer" being a torch optimizer state dict over model.parameters() in
order, the same whatever --ps and --workers. On resume the first worker loads the
servers before any worker fetches: the others' first fetch waits until it has.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed.rpc as rpc
from torch import nn

from multitower.config import Config, ParallelConfig, check_choice
from multitower.errors import UserError
from multitower.faults import maybe_inject
from multitower.flags import Flag, whole_number
from multitower.parallel.base import LossFn, Strategy
from multitower.parallel.process_group import rpc_init_method


def balance_shards(sizes: list[int], num_servers: int) -> list[list[int]]:
    """Indices of the tensors each server owns, balancing total elements: largest tensor
    first onto the least-loaded server (ties: the lower server). Tensors are never split,
    so the largest one bounds the balance (cifar10-tf's local3 holds 83% of its weights)."""
    if num_servers > len(sizes):
        raise UserError(f"--ps {num_servers} is more than the model's {len(sizes)} parameter tensors; "
                        f"use --ps {len(sizes)} or fewer")
    loads = [0] * num_servers
    shards: list[list[int]] = [[] for _ in range(num_servers)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        server = min(range(num_servers), key=lambda s: (loads[s], s))
        shards[server].append(index)
        loads[server] += sizes[index]
    return [sorted(shard) for shard in shards]


def _make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # The learning rate given here is never used: each push carries the worker's own.
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=0.01)
    return torch.optim.SGD(params, lr=0.1)


def _clone(tree):
    """A deep copy of tensors inside dicts and lists: taken under a lock, sent after it."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


class ParameterServer:
    """One shard of the parameters and its optimizer, in a server process; workers reach
    it through an RRef. Methods run on rpc threads, concurrently: `_lock` guards the
    parameters, the optimizer and the update count."""

    def __init__(self, optimizer_name: str, num_workers: int, rank: int = -1):
        self.optimizer_name = optimizer_name
        self.rank = rank  # the process's global rank, for faults injected by tests (faults.py)
        self._lock = threading.Lock()
        self._params: list[nn.Parameter] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._updates = 0  # pushes applied: the clock of staleness
        self._initialised = False
        # Completed by initialise(); a fetch that arrives first waits on it without
        # holding an rpc thread (async_execution). Completed outside the lock: it runs
        # the waiting fetches, which take the lock.
        self._ready: torch.futures.Future = torch.futures.Future()
        self._reports_lock = threading.Lock()  # the workers' log-line values, apart from training
        self._reports: dict[int, list[float | None]] = {}
        self._num_workers = num_workers

    def initialise(self, tensors: list[torch.Tensor], optimizer_state: dict | None) -> None:
        """Take the first worker's values (fresh or from a checkpoint); then serve fetches.
        optimizer_state: {"state": {local index: per-parameter state}} or None."""
        with self._lock:
            if self._initialised:
                raise RuntimeError("parameter server initialised twice")
            self._initialised = True
            self._params = [nn.Parameter(t.detach().clone()) for t in tensors]
            self._optimizer = _make_optimizer(self.optimizer_name, self._params)
            if optimizer_state is not None and optimizer_state["state"]:
                groups = self._optimizer.state_dict()["param_groups"]
                self._optimizer.load_state_dict({"state": optimizer_state["state"], "param_groups": groups})
        self._ready.set_result(None)

    @rpc.functions.async_execution
    def exchange(self, grads: list[torch.Tensor] | None, lr: float, fetched_at: int,
                 fetch: bool) -> torch.futures.Future:
        """Apply `grads` (a worker's accumulated gradients, or None) at `lr`, and/or return
        the shard. Completes with (staleness or None, tensors or None, updates so far)."""
        return self._ready.then(lambda _: self._exchange_now(grads, lr, fetched_at, fetch))

    def _exchange_now(self, grads, lr, fetched_at, fetch):
        with self._lock:
            staleness = None
            if grads is not None:
                staleness = self._updates - fetched_at
                for p, g in zip(self._params, grads):
                    p.grad = g
                for group in self._optimizer.param_groups:
                    group["lr"] = lr
                self._optimizer.step()
                self._updates += 1
                maybe_inject(self.rank, self._updates)
            # Copies, made under the lock: rpc serialises the reply after we return.
            tensors = [p.detach().clone() for p in self._params] if fetch else None
            return staleness, tensors, self._updates

    def snapshot(self) -> tuple[list[torch.Tensor], dict, int]:
        """(parameters, optimizer.state_dict(), updates): a consistent copy for a checkpoint."""
        if not self._ready.done():
            raise RuntimeError("parameter server snapshot before initialise")
        with self._lock:
            return ([p.detach().clone() for p in self._params], _clone(self._optimizer.state_dict()),
                    self._updates)

    def report(self, slot: int, worker: int, value: float) -> list[float | None]:
        """Record `value` as worker's latest for log value number `slot`; every worker's
        latest for that slot (None where a worker has not reported yet)."""
        with self._reports_lock:
            row = self._reports.setdefault(slot, [None] * self._num_workers)
            row[worker] = value
            return list(row)


# rpc runs a function by its qualified name in the callee, so a server process needs
# one place where the workers' first call finds the shard it hosts. serve() fills it
# once, before rpc starts (no worker can call before every process has joined rpc);
# afterwards it is only read. One process hosts at most one server.
_HOSTED: list[ParameterServer] = []


def _hosted_server() -> ParameterServer:
    """Runs on a server, through rpc.remote: the RRef that a worker then calls."""
    return _HOSTED[0]


def _pin_to_loopback() -> None:
    """TensorPipe listens on the address of the host name unless TP_SOCKET_IFNAME names an
    interface; when the launcher's MASTER_ADDR is loopback (`multitower train --workers`
    binds 127.0.0.1), keep the rpc sockets on loopback too."""
    try:
        address = ipaddress.ip_address(socket.gethostbyname(os.environ.get("MASTER_ADDR", "127.0.0.1")))
    except (OSError, ValueError):
        return
    if address.is_loopback:
        names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
        if names:
            os.environ.setdefault("TP_SOCKET_IFNAME", names[0])


# Set by `multitower cluster` in every emulated node (cluster/job.py).
NETWORK_ONLY_ENV = "MULTITOWER_NETWORK_ONLY"


def _network_only() -> dict:
    """TensorPipe options that keep its traffic on the network, on the emulated cluster.
    Its nodes share one kernel, so TensorPipe takes peers on other nodes for processes of
    this machine and moves tensors by cross-memory attach (its "cma" channel) around the
    shaped links: 2 downpour workers pushed and fetched 8.5 MB a step each at 3.7 steps/s
    over a 50 Mbit/s link. Across real machines it picks TCP ("uv") and "basic" itself.
    The options' only spelling in torch 2.13 is their underscored one."""
    if not os.environ.get(NETWORK_ONLY_ENV):
        return {}
    return {"_transports": ["uv"], "_channels": ["basic"]}


@dataclass
class DownpourOptions:
    ps: int = 1
    """Parameter-server processes, started besides the workers; each owns a shard of the parameters."""
    n_fetch: int = 1
    """Steps between a worker's fetches of fresh parameters from the servers."""
    n_push: int = 1
    """Steps between a worker's pushes of its accumulated gradients to the servers."""
    ps_optimizer: str = "sgd"
    """Update the servers apply, "sgd" or "adagrad" (the paper's; wants a ~20x smaller --lr, e.g. 0.005)."""


def _init_rpc(name: str, cfg: ParallelConfig, servers: int) -> None:
    """Join the job's rpc group (workers and servers) as `name`, at the job's global rank."""
    _pin_to_loopback()
    options = rpc.TensorPipeRpcBackendOptions(rpc_timeout=cfg.timeout_s, init_method=rpc_init_method(),
                                              **_network_only())
    with warnings.catch_warnings():
        # rpc's own start-up all_gather_object on its internal gloo group warns that a
        # Backend is used as a ProcessGroup (torch 2.13); nothing of ours to fix.
        warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
        rpc.init_rpc(name, rank=int(os.environ["RANK"]), world_size=cfg.workers + servers,
                     rpc_backend_options=options)


def _check_job_shape(cfg: ParallelConfig, servers: int) -> None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("--strategy downpour runs workers and parameter servers as separate processes: "
                        "start it with `multitower train` (or torchrun)")
    total = int(os.environ["WORLD_SIZE"])
    if total != cfg.workers + servers:
        raise UserError(f"--strategy downpour needs --workers {cfg.workers} + --ps {servers} = "
                        f"{cfg.workers + servers} processes, but this job has {total}")


class Downpour(Strategy):
    name = "downpour"
    Options = DownpourOptions
    ends_in_step = False  # each worker at its own pace; rpc.shutdown waits for the slowest
    FLAGS = (
        Flag("--ps", "parallel.options.ps", "downpour: parameter-server processes, besides the --workers",
             type=whole_number),
        Flag("--n-fetch", "parallel.options.n_fetch", "downpour: steps between a worker's parameter fetches",
             type=whole_number),
        Flag("--n-push", "parallel.options.n_push", "downpour: steps between a worker's gradient pushes",
             type=whole_number),
        Flag("--ps-optimizer", "parallel.options.ps_optimizer",
             "downpour: update applied by the servers; adagrad wants a ~20x smaller --lr", choices=("sgd", "adagrad")),
    )
    refuses = {"--channels-last": "copies parameters to and from its servers in NCHW order",
               "--precision fp16": "pushes raw gradients to its servers, where loss scaling cannot be undone",
               "--compile": "is not built to compile its workers' models (single, sync and local-sgd are)"}
    resume_may_change = frozenset({"ps"})  # checkpoints do not depend on the shard layout
    joins_group = False  # no process group: rpc connects workers and servers

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        options = cls.options_of(cfg.parallel)
        for flag, value, unit in (("--ps", options.ps, "process"), ("--n-fetch", options.n_fetch, "step"),
                                  ("--n-push", options.n_push, "step")):
            if value < 1:
                raise UserError(f"{flag} must be at least 1 {unit}, got {value}")
        check_choice("--ps-optimizer", options.ps_optimizer, ("sgd", "adagrad"))

    @classmethod
    def processes(cls, cfg: ParallelConfig) -> int:
        return cfg.workers + cls.options_of(cfg).ps

    @classmethod
    def serves(cls, cfg: ParallelConfig, rank: int) -> bool:
        """Global ranks W .. W+P-1 (after the W trainers) are the parameter servers."""
        return rank >= cfg.workers

    @classmethod
    def preflight(cls, cfg: Config, model: nn.Module, example: torch.Tensor | None = None) -> str:
        servers = cls.options_of(cfg.parallel).ps  # more servers than tensors fails here, before any process
        shards = balance_shards([p.numel() for p in model.parameters()], servers)
        return f"downpour: {servers} parameter server(s) holding {', '.join(str(len(s)) for s in shards)} tensors"

    @classmethod
    def serve(cls, cfg: ParallelConfig) -> None:
        """A server's whole life: host one shard until every worker has shut rpc down."""
        options = cls.options_of(cfg)
        _check_job_shape(cfg, options.ps)
        rank = int(os.environ["RANK"])
        _HOSTED.append(ParameterServer(options.ps_optimizer, cfg.workers, rank))
        _init_rpc(f"ps{rank - cfg.workers}", cfg, options.ps)
        # Graceful shutdown is a barrier over all rpc processes (no timeout): it returns
        # when every worker has reached its own, after its last push; requests are
        # served meanwhile. (A worker gone silent is named by the heartbeat's watch.)
        rpc.shutdown(graceful=True)

    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        options = self.options_of(cfg)
        _check_job_shape(cfg, options.ps)
        super().__init__(cfg, device, loss_fn)
        self.num_servers = options.ps
        # A worker's rank is its global rank (its data shard); the trainers split the batch.
        self.rank, self.world_size = int(os.environ["RANK"]), cfg.workers
        self._servers: list[rpc.RRef] = []
        self._shards: list[list[int]] = []
        self._params: list[nn.Parameter] = []
        self._accrued: list[torch.Tensor] = []  # gradients summed since the last push
        self._fetched_at: list[int] = []  # per shard: the server's update count at our last fetch
        self._in_flight: list[torch.futures.Future] | None = None  # one per server
        self._in_flight_fetches = False
        self._staleness: list[float] = []  # answered pushes not yet reported
        self._comm_bytes = 0  # gradient bytes pushed + parameter bytes fetched, not yet reported
        self._resume_optimizer: dict | None = None
        self._started = False
        self._rpc_up = False
        self._local_steps = 0
        self._report_slot = 0
        self._waited_s = 0.0  # seconds this step waited for a fetch, before its forward

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._params = list(model.parameters())
        # Before rpc starts: a bad --ps fails every worker alike, and nobody waits for them.
        self._shards = balance_shards([p.numel() for p in self._params], self.num_servers)
        self._accrued = [torch.zeros_like(p) for p in self._params]
        self._fetched_at = [0] * self.num_servers
        _init_rpc(f"trainer{self.rank}", self.cfg, self.num_servers)
        self._rpc_up = True
        self._servers = [rpc.remote(f"ps{k}", _hosted_server) for k in range(self.num_servers)]

    def _start(self) -> float:
        """Before the first step (or checkpoint): the first worker loads the servers; every
        worker asks for its first fetch. Returns seconds spent waiting."""
        start = time.perf_counter()
        self._started = True
        if self.is_rank0:
            futures = []
            for server, shard in zip(self._servers, self._shards):
                state = None
                if self._resume_optimizer is not None:
                    state = {"state": {local: self._resume_optimizer["state"][index]
                                       for local, index in enumerate(shard)
                                       if index in self._resume_optimizer["state"]}}
                tensors = [self._params[i].detach().cpu() for i in shard]
                futures.append(server.rpc_async().initialise(tensors, state))
            torch.futures.wait_all(futures)
        self._send(push=False, fetch=True)
        return time.perf_counter() - start

    def _send(self, push: bool, fetch: bool) -> None:
        lr = self.optimizer.param_groups[0]["lr"]  # the loop's schedule sets it every step
        futures = []
        for k, (server, shard) in enumerate(zip(self._servers, self._shards)):
            # .cpu() is a no-op on CPU: the buffers are replaced below, never reused after sending.
            grads = [self._accrued[i].cpu() for i in shard] if push else None
            self._comm_bytes += sum(g.numel() * g.element_size() for g in grads) if push else 0
            futures.append(server.rpc_async().exchange(grads, lr, self._fetched_at[k], fetch))
        if push:
            self._accrued = [torch.zeros_like(p) for p in self._params]
        self._in_flight, self._in_flight_fetches = futures, fetch

    @torch.no_grad()
    def _settle(self) -> float:
        """Wait for the message in flight; apply fetched shards, note staleness. Seconds waited."""
        if self._in_flight is None:
            return 0.0
        start = time.perf_counter()
        replies = [future.wait() for future in self._in_flight]
        waited = time.perf_counter() - start
        self._in_flight, self._in_flight_fetches = None, False
        staleness = [s for s, _, _ in replies if s is not None]
        if staleness:
            self._staleness.append(sum(staleness) / len(staleness))
        for k, (_, tensors, updates) in enumerate(replies):
            if tensors is not None:
                for index, tensor in zip(self._shards[k], tensors):
                    self._params[index].copy_(tensor)
                    self._comm_bytes += tensor.numel() * tensor.element_size()
                self._fetched_at[k] = updates
        return waited

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0):
        """The base's (--precision bf16: bf16 compute; pushed gradients stay float32), on
        fresh parameters: a fetch in flight is applied first."""
        self._report_slot = 0
        self._waited_s = 0.0 if self._started else self._start()
        if self._in_flight_fetches:
            self._waited_s += self._settle()
        return super().forward_backward(images, labels, weight)

    def after_update(self) -> tuple[float, dict[str, float]]:
        """Sum this step's gradients for the next push (the local step has just used them:
        the paper's local update between fetches), then push and/or fetch when due."""
        with torch.no_grad():
            for accrued, p in zip(self._accrued, self._params):
                accrued.add_(p.grad)
        self._local_steps += 1
        push = self._local_steps % self.options.n_push == 0
        fetch = self._local_steps % self.options.n_fetch == 0
        comm_s, self._waited_s = self._waited_s, 0.0  # with the fetch applied before the forward
        if push or fetch:
            comm_s += self._settle()  # at most one message in flight; fetches see our pushes
            self._send(push, fetch)
        # Bytes pushed (gradients) and fetched (parameters) since the last step's report.
        # (StepMetrics.examples: the global batch's, as if every worker kept this one's pace;
        # rank_examples_per_sec in metrics.jsonl shows each worker's own.)
        extra, self._comm_bytes = {"comm_bytes": float(self._comm_bytes)}, 0
        if self._staleness:
            extra["staleness"] = sum(self._staleness) / len(self._staleness)
            self._staleness = []
        return comm_s, extra

    def all_ranks(self, value: float) -> list[float]:
        """Every worker's latest `value`, as last reported to the first server: NOT a
        collective. The loop calls this at its log steps; a collective there would make
        every worker wait for the slowest at each log line, the coupling Downpour exists
        to avoid. Values of other workers may come from their previous log step (or be
        this worker's own before their first: NaN would print as a diverged loss and is not
        JSON); slots are told apart by call order since the step."""
        slot, self._report_slot = self._report_slot, self._report_slot + 1
        row = self._servers[0].rpc_sync().report(slot, self.rank, float(value))
        return [value if reported is None else reported for reported in row]

    def checkpoint_state(self, loop_state: dict) -> dict | None:
        """The first worker gathers every shard from the servers, one at a time (each shard
        consistent, the set not: others keep pushing meanwhile); the others return None."""
        if not self.is_rank0:
            return None
        if not self._started:
            self._start()  # e.g. resumed at the last step: servers must hold the checkpoint first
        snapshots = [future.wait() for future in [s.rpc_async().snapshot() for s in self._servers]]
        model = dict(self.model.state_dict())
        names = [name for name, _ in self.model.named_parameters()]
        optimizer_state: dict = {}
        for shard, (tensors, opt_state, _) in zip(self._shards, snapshots):
            for local, (index, tensor) in enumerate(zip(shard, tensors)):
                model[names[index]] = tensor
                if local in opt_state["state"]:
                    optimizer_state[index] = opt_state["state"][local]
        group = {k: v for k, v in snapshots[0][1]["param_groups"][0].items() if k != "params"}
        return {"model": model,
                "optimizer": {"state": optimizer_state,
                              "param_groups": [{**group, "params": list(range(len(self._params)))}]},
                **loop_state}

    def load(self, state: dict) -> dict:
        self.model.load_state_dict(state["model"])
        if self.is_rank0:  # the others' first fetch brings the servers' copy, once rank 0 loaded them
            optimizer_state = state["optimizer"]
            if self.options.ps_optimizer == "adagrad":
                for index in range(len(self._params)):
                    if "sum" not in optimizer_state.get("state", {}).get(index, {}):
                        raise UserError(f"the checkpoint holds no Adagrad state for parameter {index} (it was "
                                        f"trained with another optimizer); resume with --ps-optimizer sgd")
                self._resume_optimizer = optimizer_state
            # Plain SGD keeps no state: the servers start from the parameters alone.
        return {"ema": state["ema"], "lookahead": state.get("lookahead")}

    def close(self) -> None:
        if not self._rpc_up:
            return
        self._rpc_up = False
        # close() runs in the loop's `finally`. When an exception is on its way out (a
        # failed step, an injected fault), waiting in the graceful shutdown barrier would
        # hold this process until every other worker finishes its run; leave at once and
        # let the launcher stop the job instead.
        failing = sys.exc_info()[0] is not None
        if not failing:
            self._settle()
        rpc.shutdown(graceful=not failing)
