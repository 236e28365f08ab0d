"""Start worker processes through torch's elastic launcher, the engine behind torchrun.

`multitower train --workers N` calls launch(), which runs N copies of worker_main on
this machine with a c10d rendezvous on loopback. Across machines the same workers are
started by torchrun itself (`torchrun ... -m multitower train ...`): train() then finds
the launcher's environment (RANK, WORLD_SIZE, ...) and runs as one worker directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import threading
import socket
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from multitower.config import Config
from multitower.errors import SIGNAL_CAUSES, Interrupted, PeerLost, PeerStopped, UserError, WorkerFailed, first_line
from multitower.heartbeat import record_failure, recorded_failures, worker_pids
from multitower.parallel import processes
from multitower.procs import process_state
from multitower.train.checkpoint import CheckpointDir


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
def worker_main(config_json: str, given: dict | None = None) -> dict:
    """One worker: its rank comes from the environment the agent set; `given` holds a
    Python caller's own recipe, data and model factory (multitower.fit), pickled to it."""
    import json
    return run_worker(Config.from_dict(json.loads(config_json)), **(given or {})).__dict__


def run_worker(cfg: Config, **given):
    """train(cfg) in a launched worker (ours or torchrun's): a failure is recorded in the
    launcher's store for launch() to pick the cause, and leaves as WorkerFailed, whose
    message is its one line (printed by the CLI under torchrun); a bug's traceback goes to
    RUN_DIR/logs/rank-R.log, and to stderr as well with --debug."""
    from multitower.train.loop import train
    rank = int(os.environ.get("RANK", 0))
    try:
        return train(cfg, **given)
    except (PeerStopped, PeerLost) as exc:  # a verdict on another rank, or a lost peer
        record_failure("verdict" if isinstance(exc, PeerStopped) else "lost", str(exc))
        raise WorkerFailed(str(exc)) from None
    except UserError as exc:
        record_failure("error", str(exc))
        raise WorkerFailed(f"rank {rank} failed: {exc}") from None
    except Exception as exc:
        message = describe_bug(exc, cfg.run.run_dir, rank)
        record_failure("error", message)
        raise WorkerFailed(f"rank {rank} failed: {message}") from None


def describe_bug(exc: BaseException, run_dir: str, rank: int) -> str:
    """One line for an unexpected exception, its traceback logged in the run directory
    (and printed with --debug)."""
    from multitower.train.run_dir import log_traceback
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(exc)
    where = log_traceback(run_dir, rank, exc)
    found = f"traceback in {where}" if where else "rerun with --debug for its traceback"
    return f"{type(exc).__name__}: {first_line(exc)} (an internal error; {found})"


DEBUG_ENV = "MULTITOWER_DEBUG"  # set by --debug: tracebacks are printed, not only logged
SHUTDOWN_S = 3
"""Seconds the agent gives a failed group's other workers to exit after SIGTERM before
SIGKILL (torch's default, 30, is how long a frozen worker held the verdict back)."""


def launch(cfg: Config, given: dict | None = None) -> dict:
    """Run the job's processes (the workers, and downpour's parameter servers) on this
    machine, each train(cfg, **given); return rank 0's TrainResult fields. The launcher holds the run
    directory's lock for the whole job, restarts included, and writes its final status.
    A failure on any rank stops the whole group and becomes one UserError naming the rank."""
    from multitower.train.run_dir import HELD_BY_LAUNCHER, RunDirLock
    run_dir = Path(cfg.run.run_dir)
    with RunDirLock(run_dir):
        environment = {HELD_BY_LAUNCHER: str(run_dir.resolve()), "MULTITOWER_LAUNCHER": "1"}
        if not os.environ.get(DEBUG_ENV):
            # libtorch's warnings (TensorPipe's "encountered error when reading incoming
            # request ... eof" as a peer goes) would precede our one line; --debug keeps them.
            environment["TORCH_CPP_LOG_LEVEL"] = os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")
        saved = {key: os.environ.get(key) for key in environment}
        os.environ.update(environment)  # the workers are spawned with this environment
        try:
            return _launch(cfg, given)
        except UserError as exc:
            _final_status(cfg, exc)
            raise
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _final_status(cfg: Config, exc: UserError) -> None:
    """The run's status after the launcher ended it: the workers may have died without a word."""
    from multitower.train.run_dir import read_status, write_status
    run_dir = Path(cfg.run.run_dir)
    if not (run_dir / "config.json").exists():
        return  # the run never started: nothing of it to describe
    status = read_status(run_dir) or {}
    latest = CheckpointDir(run_dir / "checkpoints").latest_step()
    state = "interrupted" if isinstance(exc, Interrupted) else "failed"
    try:
        write_status(run_dir, state, int(status.get("step", 0)), latest, str(exc))
    except OSError:
        pass  # e.g. the full disk that ended the run


def _launch(cfg: Config, given: dict | None) -> dict:
    # The agent logs every state change, and each failure with a traceback of its own
    # machinery; the failure is reported below in one line instead.
    # (Each module's logger has its own level, set by torch's get_logger: set them all.)
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic", "torch.multiprocessing"]:
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
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
    log_dir = AgentLogDir()
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes(cfg.parallel),
        run_id=f"multitower-{uuid.uuid4().hex[:8]}",
        rdzv_backend=LOOPBACK_C10D, rdzv_endpoint=f"127.0.0.1:{rendezvous_store.port}",
        rdzv_configs={"timeout": 120}, local_addr="127.0.0.1",
        max_restarts=cfg.parallel.max_restarts, monitor_interval=0.5, start_method="spawn",
        shutdown_timeout=SHUTDOWN_S, logs_specs=DefaultLogsSpecs(log_dir=log_dir.path))
    reaper = FrozenWorkerReaper(processes(cfg.parallel), cfg.parallel.max_restarts)
    try:
        results = elastic_launch(launch_config, worker_main)(cfg.to_json(), given)
    except ChildFailedError as exc:
        reaper.close()
        raise UserError(failure_verdict(exc, cfg, reaped=reaper.killed)) from None
    except SignalException as exc:
        signal_name = signal.Signals(exc.sigval).name
        latest = CheckpointDir(Path(cfg.run.run_dir) / "checkpoints").latest_step()
        kept = f"the newest checkpoint is step {latest}; --resume continues" if latest is not None \
            else "no checkpoint was written yet"
        raise Interrupted(f"interrupted by {signal_name}: the workers were stopped; {kept} "
                          f"({cfg.run.run_dir})", int(exc.sigval)) from None
    finally:
        reaper.close()
        log_dir.remove()
    return results[0]


class AgentLogDir:
    """The agent's per-attempt folders (the workers' error.json files, read into
    ChildFailedError). Left alone, torch makes a /tmp/torchelastic_* for every job and
    never removes it. Ours is removed when the job ends; a launcher killed with SIGKILL
    cannot, so each launch first removes the folders of launchers that are gone. Owning
    launchers hold an flock on their folder, which the kernel drops when they die."""

    PREFIX = "multitower-launch-"
    # mkdtemp and flock are two calls: a folder this young may be a live launcher's
    # that has not locked it yet.
    MIN_AGE_S = 60.0

    def __init__(self) -> None:
        self.remove_stale()
        self.path = tempfile.mkdtemp(prefix=self.PREFIX)
        self._fd = os.open(self.path, os.O_RDONLY)  # not inherited by the workers (PEP 446)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)

    @classmethod
    def remove_stale(cls, folder: str | None = None) -> list[str]:
        """Remove the launch folders under `folder` (the temp dir) that no live launcher
        holds and that are older than MIN_AGE_S. Returns those removed."""
        removed = []
        for path in Path(folder or tempfile.gettempdir()).glob(cls.PREFIX + "*"):
            try:
                if time.time() - path.stat().st_mtime < cls.MIN_AGE_S:
                    continue
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # removed meanwhile, or not ours to open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its launcher is alive
            finally:
                os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
        return removed


class FrozenWorkerReaper:
    """SIGKILLs this machine's workers that are stopped (SIGSTOP, state "T") once their
    attempt is failing: the agent stops a failed group with SIGTERM, which a stopped
    process never handles, and then waits 30 s before SIGKILL (torch 2.13's _stop_workers,
    which ignores shutdown_timeout). Workers name their pids in the store (heartbeat's
    info/<rank>); an attempt is failing once a worker recorded a failure or is gone."""

    def __init__(self, processes: int, max_restarts: int):
        self.processes, self.max_restarts = processes, max_restarts
        self.killed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="multitower-reaper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            store = _worker_stores[-1] if _worker_stores else None
            if store is None:
                continue
            for attempt in range(self.max_restarts + 1):
                try:
                    pids = worker_pids(store, attempt, self.processes)
                    failing = bool(recorded_failures(store, attempt, self.processes)) or \
                        any(not os.path.exists(f"/proc/{pid}") for pid in pids)
                except Exception:  # noqa: BLE001 - a store between attempts
                    continue
                for pid in pids if failing else []:
                    if process_state(pid) in ("T", "t"):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            self.killed.add(pid)  # our doing: not the failure's cause

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)




def failure_verdict(exc: ChildFailedError, cfg: Config, reaped: set[int] = frozenset()) -> str:
    """The one line that says which rank caused the failure and why, from what the workers
    recorded (their own errors, verdicts on a silent peer, lost connections) and what the
    agent saw (exit codes, signals): a rank's own error first, then a rank killed by a
    signal, then a verdict naming a stopped rank, then a lost connection."""
    count = processes(cfg.parallel)
    store = _worker_stores[-1] if _worker_stores else None
    recorded = {}
    if store is not None:
        for attempt in range(cfg.parallel.max_restarts, -1, -1):  # the failed, last, attempt
            recorded = recorded_failures(store, attempt, count)
            if recorded:
                break
    killed = {rank: failure for rank, failure in exc.failures.items()
              if failure.exitcode < 0 and failure.signal_name() != "SIGTERM" and failure.pid not in reaped}
    by_kind = {kind: sorted((stamp, rank, message) for rank, (k, stamp, message) in recorded.items() if k == kind)
               for kind in ("error", "verdict", "lost")}
    if by_kind["error"]:
        _, rank, message = by_kind["error"][0]
        line = f"worker rank {rank} failed: {message}"
    elif killed:
        rank, failure = min(killed.items(), key=lambda item: item[1].timestamp)
        cause = SIGNAL_CAUSES.get(failure.signal_name(), "killed")
        line = f"worker rank {rank} failed: killed by {failure.signal_name()} ({cause})"
    elif by_kind["verdict"]:
        line = by_kind["verdict"][0][2]
    elif by_kind["lost"]:
        _, rank, message = by_kind["lost"][0]
        line = f"worker rank {rank} failed: {message}"
    else:
        rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
        line = f"worker rank {rank} failed: {first_line(failure.message)}"
    latest = CheckpointDir(Path(cfg.run.run_dir) / "checkpoints").latest_step()
    if latest is not None:
        line += f" [newest checkpoint: step {latest}; --resume continues]"
    return line
