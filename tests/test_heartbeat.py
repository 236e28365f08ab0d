"""heartbeat.py's judgement of a store out of reach, with fake stores: a request to a store
behind a cut link blocks for minutes, so the verdict must not wait for one."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

from multitower import heartbeat
from multitower.heartbeat import Heartbeat
from multitower.procs import process_state


class QuietStore:
    """Answers every request at once (the main thread's client)."""

    def set(self, key, value):
        pass

    def check(self, keys):
        return False


class CutOffStore:
    """Every request blocks until released, as TCPStore's did behind a cut link (> 100 s,
    whatever its timeout)."""

    def __init__(self):
        self.released = threading.Event()

    def set(self, key, value):
        self.released.wait()

    check = get = set


def test_a_store_out_of_reach_is_named_within_the_timeout(monkeypatch):
    cut = CutOffStore()
    monkeypatch.setattr(heartbeat, "_attempt_store", lambda timeout_s: cut)
    monkeypatch.setenv("MASTER_ADDR", "198.18.0.100")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("GROUP_RANK", "1")
    said = []
    beat = Heartbeat(1, 2, timeout_s=2.0, store=QuietStore(), on_silence=said.append)
    started = time.monotonic()
    beat.start()
    try:
        while not said and time.monotonic() - started < 10:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        cut.released.set()
        beat.stop()
    assert len(said) == 1, said
    assert re.fullmatch(r"rank 1 \(node 1, pid \d+\) lost the launcher's store at 198\.18\.0\.100:29500 \(node 0\) "
                        r"for \d s: node 0, or the link to it, is down \(--timeout 2 s\)", said[0]), said[0]
    assert elapsed < 2.0 + 2 * heartbeat.BEAT_S + 0.5, f"named {elapsed:.1f} s after the last answer"
    assert beat.describe(1) == said[0].split(" lost")[0]  # its own description, without asking the store


ORPHAN = """
import ctypes, os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker whose way out hangs: no SIGINT ends it
from multitower.heartbeat import end_with_launcher
end_with_launcher()
print(os.getpid(), flush=True)
# Blocked holding the GIL, as a worker was in a process group's destructor: no thread of its
# own could run (PyDLL keeps the GIL across the call).
ctypes.PyDLL(None).sleep(600)
"""
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
print(worker.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


def test_a_worker_ends_when_its_launcher_is_gone():
    """end_with_launcher: a worker of an elastic agent (TORCHELASTIC_RUN_ID set) whose agent
    was SIGKILLed ends ORPHAN_GRACE_S later, even blocked with the GIL held, and says why on
    its stderr; its watcher ends with it (the autouse leak check)."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, ORPHAN], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "TORCHELASTIC_RUN_ID": "test"})
    worker = int(launcher.stdout.readline())
    launcher_pid = launcher.pid
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < heartbeat.ORPHAN_GRACE_S + 10:
        if process_state(worker) in ("Z", None):
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError(f"the orphaned worker {worker} lived on {heartbeat.ORPHAN_GRACE_S + 10:.0f} s")
    assert time.monotonic() - killed >= heartbeat.ORPHAN_GRACE_S - 0.5  # it waited its grace first
    said = launcher.stderr.read()  # the worker's stderr, the launcher's: at its end once both are gone
    assert said.strip().splitlines() == [f"multitower: error: rank ?: its launcher (pid {launcher_pid}) is gone, "
                                         f"killed or crashed; this process stops too"], said
