"""Which process stopped, and why the job ended: per-process state in the launcher's store.

Every process of a multi-process job (trainers, downpour's parameter servers, pipeline
stages) keeps three kinds of keys in the c10d TCPStore that the launcher (torch's
elastic agent, or torchrun) serves at MASTER_ADDR:MASTER_PORT, under the restart
attempt's prefix:
  info/<rank>    who it is: pid, node (GROUP_RANK), a label such as "parameter server 0"
  alive/<rank>   a counter a daemon thread raises every BEAT_S seconds: a sign of life
                 that continues while the main thread waits in a collective, and stops
                 when the whole process is frozen (SIGSTOP), killed, or cut off
  step/<rank>    the global step the training loop last started (main thread)
  failed/<rank>  why it failed: "<kind> <message>" (kind: error, verdict or lost)

The same thread watches the next rank's counter (a ring, so the store's load grows
with the world size, not its square): a rank silent for longer than --timeout ends the
job with a verdict naming it, even where no collective would notice (downpour's
workers never wait for each other). After a collective fails, `verdict()` names the
rank that caused it: one with no sign of life, else one behind in steps.

Silence is judged by whether a counter changes on the watcher's own monotonic clock,
never by comparing timestamps from two machines' clocks.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from multitower.attempt import current_attempt

BEAT_S = 1.0  # seconds between signs of life
# The store client's timeout for the watching thread's requests and the last records of a
# failing process (they take milliseconds on this 2-core host, loaded or not). It bounds a
# connection attempt only: a request to a store whose link is cut blocks far longer (a
# TCPStore.check blocked > 100 s with its timeout at 5 s, torch 2.13: the kernel retransmits
# for ~15 min), which is why a second thread judges the time since the store last answered.
REQUEST_TIMEOUT_S = 5.0
FROZEN_AFTER_S = 2.5 * BEAT_S  # no change in this long, while we wait for it: frozen
KINDS = ("error", "verdict", "lost")
"""A failure's kind: "error" (the rank's own: a user error, a bug, divergence), "verdict"
(it names another rank that stopped), "lost" (a peer went away, no one named)."""


def _attempt_store(timeout_s: float) -> dist.Store | None:
    """A client of the launcher's store under this attempt's prefix, or None without one."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port:
        return None
    store = dist.TCPStore(address, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"multitower/attempt-{current_attempt()}/", store)


def record_failure(kind: str, message: str) -> None:
    """Leave this process's failure in the launcher's store, for launch() to pick the
    cause among the ranks that failed (best effort: the store may be gone with the job)."""
    rank = os.environ.get("RANK")
    if rank is None:
        return
    try:
        store = _attempt_store(5.0)
        if store is not None:
            store.set(f"failed/{rank}", f"{kind} {time.time()} {message}")
    except Exception:  # noqa: BLE001 - the launcher still sees the exit status
        pass


def recorded_failures(store: dist.Store, attempt: int, processes: int) -> dict[int, tuple[str, float, str]]:
    """rank -> (kind, time, message) of the failures recorded in `attempt` (launcher side)."""
    prefixed = dist.PrefixStore(f"multitower/attempt-{attempt}/", store)
    found = {}
    for rank in range(processes):
        try:
            if prefixed.check([f"failed/{rank}"]):
                kind, stamp, message = prefixed.get(f"failed/{rank}").decode().split(" ", 2)
                found[rank] = (kind, float(stamp), message)
        except Exception:  # noqa: BLE001 - a store being torn down
            pass
    return found


def worker_pids(store: dist.Store, attempt: int, processes: int) -> list[int]:
    """The pids the processes of `attempt` recorded (launcher side; those that started)."""
    prefixed = dist.PrefixStore(f"multitower/attempt-{attempt}/", store)
    pids = []
    for rank in range(processes):
        if prefixed.check([f"info/{rank}"]):
            pids.append(int(json.loads(prefixed.get(f"info/{rank}").decode())["pid"]))
    return pids


class Heartbeat:
    """This process's signs of life and step, and its watch over the next rank.

    `on_silence(verdict)` runs on the watching thread when the watched rank has been silent
    longer than `timeout_s`; by default it records the verdict and ends this process at
    once (the main thread may be blocked in C++ for as long again)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store: dist.Store | None,
                 on_silence=None):
        self.rank, self.world_size, self.timeout_s, self.store = rank, world_size, timeout_s, store
        self.on_silence = on_silence or self._end
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._label = ""
        self._me = f"rank {rank}"  # this rank described (describe), known without asking the store
        self._store_lost = False  # the store has not answered for --timeout
        self._last_contact = time.monotonic()  # when the store last answered the watching thread
        self._silenced = threading.Lock()  # on_silence runs once, from whichever thread judges first
        self._teardown: TeardownBound | None = None

    @classmethod
    def from_environment(cls, timeout_s: float, on_silence=None) -> "Heartbeat":
        """Connected to the launcher's store; inert in a one-process job."""
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        store = _attempt_store(min(timeout_s, 30.0)) if world_size > 1 else None
        return cls(rank, world_size, timeout_s, store, on_silence)

    def start(self, label: str = "") -> "Heartbeat":
        if self.store is None:
            return self
        self._label = label
        info = {"pid": os.getpid(), "node": os.environ.get("GROUP_RANK", "0"), "label": label}
        self._me = _described(self.rank, info)
        self.store.set(f"info/{self.rank}", json.dumps(info))
        self.store.set(f"alive/{self.rank}", "0")
        self._last_contact = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="multitower-heartbeat", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch_store, name="multitower-store-watch", daemon=True).start()
        return self

    def beat(self, step: int) -> None:
        """Record that this rank starts global step `step` (1-based) now."""
        if self.store is not None:
            self.store.set(f"step/{self.rank}", str(step))

    def bound_teardown(self, bound: "TeardownBound") -> None:
        """Hold `bound` until this heartbeat's close (or a failing stop): train()'s end."""
        self._teardown = bound

    def _release_teardown(self) -> None:
        if self._teardown is not None:
            self._teardown.release()
            self._teardown = None

    def stop(self, failing: bool = False) -> None:
        """Stop beating; `failing`: say so ("failed"), as this process reports its own
        failure, so that no peer names it as one that fell silent."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        if failing and self.store is not None:
            try:
                self.store.set(f"alive/{self.rank}", "failed")
            except Exception:  # noqa: BLE001 - the job may be ending around us
                pass
        if failing:
            self._release_teardown()

    def close(self) -> None:
        """This process ends normally: stop beating, and say so, so that no one waits for it."""
        if self.store is None:
            self._release_teardown()
            return
        self.stop()
        try:
            self.store.set(f"alive/{self.rank}", "done")
        except Exception:  # noqa: BLE001 - the job may be ending around us
            pass
        self._release_teardown()

    # -- the watching thread ---------------------------------------------------------------
    def _run(self) -> None:
        # A client of its own: the main thread's may be in the middle of a request.
        timeout_s = min(self.timeout_s, REQUEST_TIMEOUT_S)
        store = _attempt_store(timeout_s)
        watched = (self.rank + 1) % self.world_size
        count, last_value, last_change = 0, None, time.monotonic()
        while not self._stop.wait(BEAT_S):
            try:
                if store is None:
                    store = _attempt_store(timeout_s)
                count += 1
                store.set(f"alive/{self.rank}", str(count))
                value = store.get(f"alive/{watched}").decode() if store.check([f"alive/{watched}"]) else None
                self._last_contact = time.monotonic()
            except Exception:  # noqa: BLE001 - the store, and so the launcher, is unreachable: _watch_store judges
                store = None  # a request that timed out may leave its answer on the socket: a new client next time
                continue
            now = time.monotonic()
            if value != last_value or value in ("done", "failed"):
                last_value, last_change = value, now
            elif now - last_change > self.timeout_s:
                self._silence(self._silent_sentence(watched, now - last_change) +
                              f"; {self.describe(self.rank)} gave up waiting (--timeout {self.timeout_s:g} s)")
                return

    def _watch_store(self) -> None:
        """The store answered no request of the watching thread for --timeout: its node, or
        the link to it, is down. Judged apart from the requests, which may block for minutes."""
        while not self._stop.wait(BEAT_S):
            lost_s = time.monotonic() - self._last_contact
            if lost_s > self.timeout_s:
                self._store_lost = True
                where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                self._silence(f"{self._me} lost the launcher's store at {where} (node 0) for {lost_s:.0f} s: "
                              f"node 0, or the link to it, is down (--timeout {self.timeout_s:g} s)")
                return

    def _silence(self, verdict: str) -> None:
        if self._silenced.acquire(blocking=False):  # never released: once per process
            self.on_silence(verdict)

    # -- verdicts -----------------------------------------------------------------------------
    def describe(self, rank: int) -> str:
        """"rank 1 (node 0, pid 4242)", with its label where it has one (this rank's own
        without a request: the store may be out of reach)."""
        if rank == self.rank:
            return self._me
        try:
            info = json.loads(self.store.get(f"info/{rank}").decode()) if self.store.check([f"info/{rank}"]) else {}
        except Exception:  # noqa: BLE001
            info = {}
        return _described(rank, info)

    def _end(self, verdict: str) -> None:
        """The default on_silence: _end_process, without the store's records when it is out of
        reach (each would wait for its connection to time out first)."""
        _end_process(verdict, record=not self._store_lost)

    def _silent_sentence(self, rank: int, silent_s: float | None = None) -> str:
        step = self._read(f"step/{rank}")
        during = f" during step {step}" if step is not None else ""
        silence = f"no sign of life for {silent_s:.0f} s" if silent_s is not None else "no sign of life"
        return f"{self.describe(rank)} stopped responding{during}: {silence} (frozen, killed, or its machine unreachable)"

    def _read(self, key: str) -> str | None:
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:  # noqa: BLE001
            return None

    def verdict(self) -> str | None:
        """After a collective failed here: a sentence naming the rank(s) that caused it, or None.
        Ranks with no sign of life come first (two looks FROZEN_AFTER_S apart), then those
        whose training loop is behind the most advanced one."""
        if self.store is None:
            return None
        others = [r for r in range(self.world_size) if r != self.rank]
        first = {r: self._read(f"alive/{r}") for r in others}
        time.sleep(FROZEN_AFTER_S)
        frozen = [r for r in others if first[r] not in (None, "done", "failed")
                  and self._read(f"alive/{r}") == first[r]]
        if frozen:
            return "; ".join(self._silent_sentence(r) for r in frozen)
        steps = {r: self._read(f"step/{r}") for r in range(self.world_size)}
        steps = {r: int(s) for r, s in steps.items() if s is not None}
        if not steps:
            return None
        front = max(steps.values())
        behind = [r for r in range(self.world_size) if r in steps and steps[r] < front]
        return "; ".join(f"{self.describe(r)} stopped responding after starting step {steps[r]}"
                         for r in behind) or None


def _described(rank: int, info: dict) -> str:
    parts = [info["label"]] if info.get("label") else []
    parts += [f"node {info['node']}", f"pid {info['pid']}"] if info else []
    return f"rank {rank}" + (f" ({', '.join(parts)})" if parts else "")


def _end_process(verdict: str, record: bool = True) -> None:
    """On silence: record the verdict (unless `record` is False), say it where no launcher
    will, and exit now (os._exit: the main thread may be blocked in a collective for a long
    time yet)."""
    if record:
        record_failure("verdict", verdict)
        with contextlib.suppress(Exception):
            store = _attempt_store(REQUEST_TIMEOUT_S)
            store.set(f"alive/{os.environ.get('RANK', 0)}", "failed")  # not a silence: peers must not name us
    if not os.environ.get("MULTITOWER_LAUNCHER"):
        with contextlib.suppress(OSError):  # a stderr whose reader is gone must not stop the exit
            print(f"multitower: error: {verdict}", file=sys.stderr, flush=True)
    os._exit(1)


ORPHAN_GRACE_S = 5.0  # after the launcher is gone, before this worker is ended
_guarded: list[subprocess.Popen] = []  # end_with_launcher's watcher (once per process)

# The watcher: a shell loop beside the worker, its child. Once a second it reads the
# worker's parent from /proc/PID/stat (the fields after "(comm) ": state, ppid, ...); when
# that is no longer the launcher, it waits the grace, says so on the worker's stderr and
# SIGKILLs it. Its own output goes nowhere: it opens the worker's stderr only to say that
# line, so it never holds a pipe whose reader waits for the job's end. setpriv's
# parent-death signal ends the watcher the moment the worker ends (without setpriv, the
# check after the loop: it outlives the worker by <= 1 s).
ORPHAN_WATCH = r"""
trap '' PIPE
worker=$PPID launcher=$1 grace=$2 rank=$3
while read -r stat < /proc/$worker/stat; do
  set -- ${stat##*") "}
  [ "$2" = "$launcher" ] || break
  sleep 1
done 2>/dev/null
[ -e /proc/$worker ] || exit 0
sleep "$grace"
[ -e /proc/$worker ] || exit 0
echo "multitower: error: rank $rank: its launcher (pid $launcher) is gone, killed or crashed; this process stops too" \
  2>/dev/null > /proc/$worker/fd/2
kill -9 "$worker"
"""


def end_with_launcher() -> None:
    """In a worker of an elastic agent (multitower's launcher, torchrun): end this process
    when the agent is gone (SIGKILLed, it could not stop its workers). torch's spawn asks the
    kernel for a SIGINT when the parent dies (PR_SET_PDEATHSIG), but a worker's way out after
    it may hang: in CI one worker orphaned so slept on past --timeout (300 s), holding a core
    and its files; another hung in a process group's destructor holding the GIL, where a
    guard thread of its own (this function's first form) could never run. So the guard is a
    process: ORPHAN_WATCH, started from the main thread (the parent-death signal follows the
    thread that starts it), ORPHAN_GRACE_S after the parent changes, SIGKILL."""
    if not os.environ.get("TORCHELASTIC_RUN_ID") or _guarded:
        return
    tie = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []  # else it lingers <= 1 s
    _guarded.append(subprocess.Popen(
        [*tie, "sh", "-c", ORPHAN_WATCH, "multitower-orphan-watch", str(os.getppid()), str(ORPHAN_GRACE_S),
         os.environ.get("RANK", "?")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


TEARDOWN_GRACE_S = 60.0  # at most (or --timeout, if shorter): well inside the agents' 300 s exit barrier


class TeardownBound:
    """Training is over and saved; what train() has left (the process group's teardown, the
    heartbeat's last word to the store) gets min(--timeout, TEARDOWN_GRACE_S). A 4-node
    cluster job (1 of ~130) trained to its end and then failed: one worker never exited,
    the other nodes' launchers waited out torch's 300 s exit barrier, and their store went
    with them (RendezvousConnectionError). Past the grace, every thread's stack goes to
    RUN_DIR/logs/rank-R.log and the process ends with status 0, its work done, saying so
    in one line. Where a thread holds the GIL (the hang end_with_launcher met) the Python
    timer cannot run: faulthandler's own thread then writes the stacks and exits 1.
    Only in a worker that an elastic agent started as a command (torchrun, `multitower
    cluster`'s nodes), which only its exit status reports; multitower's own launcher
    (`train --workers N`) waits for each worker's return value through a multiprocessing
    queue, so one that ends itself would leave it waiting for ever. Released when train()
    returns."""

    def __init__(self, log_path: Path, rank: int, timeout_s: float):
        """log_path: the rank's log (train.run_dir.rank_log), where the stacks go."""
        self.grace_s = min(timeout_s, TEARDOWN_GRACE_S)
        self.rank, self.path = rank, log_path
        self._released = threading.Event()
        self._log = None
        if not os.environ.get("TORCHELASTIC_RUN_ID") or multiprocessing.parent_process() is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made = not self.path.exists()  # then removed again on release, still empty
            self._log = open(self.path, "a")
        except OSError:
            return
        faulthandler.dump_traceback_later(self.grace_s + 5.0, exit=True, file=self._log)
        threading.Thread(target=self._end, name="multitower-teardown-bound", daemon=True).start()

    def _end(self) -> None:
        if self._released.wait(self.grace_s):
            return
        self._log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}: "
                        f"still in its teardown {self.grace_s:g} s after training ended; every thread:\n")
        self._log.flush()
        faulthandler.dump_traceback(file=self._log, all_threads=True)
        self._log.flush()
        sys.stderr.write(f"multitower: warning: rank {self.rank}: its teardown after training hung for "
                         f"{self.grace_s:g} s (every thread's stack: {self.path}); it exits, its work saved\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(0)

    def release(self) -> None:
        if self._log is None or self._released.is_set():
            return
        faulthandler.cancel_dump_traceback_later()
        self._released.set()
        self._log.close()
        with contextlib.suppress(OSError):
            if self._made and self.path.stat().st_size == 0:
                self.path.unlink()  # nothing to say: no empty rank log in every run
