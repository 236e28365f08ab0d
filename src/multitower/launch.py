"""Start worker processes through torch's elastic launcher, the engine behind torchrun.

`multitower train --workers N` calls launch(), which runs N copies of worker_main on
this machine with a c10d rendezvous on loopback. Across machines the same workers are
started by torchrun itself (`torchrun ... -m multitower train ...`): train() then finds
the launcher's environment (RANK, WORLD_SIZE, ...) and runs as one worker directly.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
import uuid
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from multitower.config import Config
from multitower.errors import UserError


def in_launched_worker() -> bool:
    """True inside a process started by torchrun or by launch()."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_store_server(port: int = 0) -> dist.TCPStore:
    """A TCPStore server that listens on 127.0.0.1 only. TCPStore binds its server to
    every interface and takes no address, but it accepts a socket already listening
    (master_listen_fd). multi_tenant: a later TCPStore(..., port, is_master=True,
    multi_tenant=True) in this process, as torch's rendezvous creates, reuses this one."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    port = sock.getsockname()[1]
    return dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False,
                         master_listen_fd=sock.detach())


_worker_stores: list[dist.TCPStore] = []  # the stores our handler served, newest last

# Where a failing worker leaves "<time> <message>", per restart attempt and rank.
FAILED_PREFIX = "multitower/failed/"


def record_failure(message: str) -> None:
    """Leave this worker's failure, and when it happened, in the launcher's store, so that
    launch() can tell the rank that failed first from those that failed because of it."""
    address, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if not (address and port and rank):
        return
    try:
        store = dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=5))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store.set(f"{FAILED_PREFIX}{attempt}/{rank}", f"{time.time()} {first_line(message)}")
    except Exception:  # the store may be gone with the job; the agent still reports the failure
        pass


def _recorded_failures(processes: int, attempt: int) -> dict[int, tuple[float, str]]:
    """rank -> (time, message) of the failures workers recorded in the last attempt."""
    found = {}
    for store in _worker_stores[-1:]:
        for rank in range(processes):
            key = f"{FAILED_PREFIX}{attempt}/{rank}"
            try:
                if store.check([key]):
                    stamp, message = store.get(key).decode().split(" ", 1)
                    found[rank] = (float(stamp), message)
            except Exception:
                pass
    return found


def _loopback_store_for_workers(port: int) -> dist.TCPStore:
    store = loopback_store_server(port)
    _worker_stores.append(store)
    return store


def _loopback_c10d_handler(params: RendezvousParameters):
    """torch's c10d rendezvous whose second store (the one the workers' process groups
    meet at, created by rank 0's agent on a free port) also listens on loopback only."""
    backend, store = create_backend(params)
    params.backend = backend.name  # create_handler checks that the names match
    handler = create_handler(store, backend, params)
    handler._create_tcp_store_server = lambda addr, port: _loopback_store_for_workers(port)
    return handler


LOOPBACK_C10D = "multitower-c10d"


@record  # writes the worker's exception to the error file that the agent reports
def worker_main(config_json: str) -> dict:
    """One worker: its rank comes from the environment the agent set."""
    import json
    from multitower.train.loop import train
    try:
        result = train(Config.from_dict(json.loads(config_json)))
    except UserError as exc:
        # A user error needs no traceback: its message becomes the one line the user sees.
        record_failure(str(exc))
        raise RuntimeError(f"{exc}") from None
    except Exception as exc:
        record_failure(f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc))
        traceback.print_exc()  # a bug: its traceback is worth showing, once
        raise
    return result.__dict__


def launch(cfg: Config) -> dict:
    """Run cfg.parallel.processes() processes (the workers, and downpour's parameter servers)
    on this machine; return rank 0's TrainResult fields.
    A failure on any rank stops the whole group and becomes one UserError naming the rank."""
    # The agent logs every state change, and each failure with a traceback of its own
    # machinery; the failure is reported below in one line instead.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # When the agent kills a failed group, multiprocessing's resource tracker (a process
    # of its own, started with our -W options) warns about the workers' semaphores
    # after our one-line message; they are the agent's, and the tracker frees them.
    if "ignore::UserWarning:multiprocessing.resource_tracker" not in sys.warnoptions:
        sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    # Every listening socket on loopback: the rendezvous store is created here and
    # reused by the c10d backend (multi-tenant), the workers' store by our handler.
    rendezvous_store = loopback_store_server()
    # Registered here, not at import: importing multitower changes nothing in torch.
    # (Registering the same creator again is a no-op.)
    rendezvous_handler_registry.register(LOOPBACK_C10D, _loopback_c10d_handler)
    _worker_stores.clear()  # a previous launch's stores (and their listening sockets) go
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.parallel.processes(),
        run_id=f"multitower-{uuid.uuid4().hex[:8]}",
        rdzv_backend=LOOPBACK_C10D, rdzv_endpoint=f"127.0.0.1:{rendezvous_store.port}",
        rdzv_configs={"timeout": 120}, local_addr="127.0.0.1",
        max_restarts=cfg.parallel.max_restarts, monitor_interval=0.5, start_method="spawn")
    try:
        results = elastic_launch(launch_config, worker_main)(cfg.to_json())
    except ChildFailedError as exc:
        rank, failure = root_failure(exc)
        recorded = _recorded_failures(cfg.parallel.processes(), cfg.parallel.max_restarts)
        killed = failure.exitcode < 0 and failure.signal_name() != "SIGTERM"
        if recorded and not killed:
            # The rank whose own failure came first caused the others' (a peer's lost
            # connection, a heartbeat verdict); the agent may have seen another exit first.
            first = min(recorded, key=lambda r: recorded[r][0])
            raise UserError(f"worker rank {first} failed: {recorded[first][1]}") from None
        if failure.exitcode < 0:  # killed by a signal: the OOM killer, kill -9
            raise UserError(f"worker rank {rank} failed: killed by {failure.signal_name()} "
                            f"(out of memory, or killed)") from None
        raise UserError(f"worker rank {rank} failed: {first_line(failure.message)}") from None
    return results[0]


def root_failure(exc: ChildFailedError):
    """(rank, failure) of the rank that caused the others to fail. The earliest failure is
    not always it: when rank 1 raises, rank 0's collective can error out first with the
    heartbeat's "rank 1 stopped responding", and the agent then SIGTERMs the rest. So
    failures of that kind count only when there is nothing else."""
    def consequence(failure) -> bool:
        if failure.exitcode < 0:
            return failure.signal_name() == "SIGTERM"
        return "stopped responding" in first_line(failure.message)
    return min(exc.failures.items(), key=lambda item: (consequence(item[1]), item[1].timestamp))


def first_line(message) -> str:
    """The meaningful line of a failure message (which may be a dict from the error file)."""
    if isinstance(message, dict):
        message = message.get("message", str(message))
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "no message"
    # A traceback's last line names the exception; "RuntimeError: " adds nothing for users.
    last = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return last.removeprefix("RuntimeError: ")
