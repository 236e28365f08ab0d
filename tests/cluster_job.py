"""What the multi-node tests share: a `multitower cluster` job in the background whose output
is read as it comes (a pipe left unread would block it), and the faults done to its nodes
from outside, as a crash, a machine going down or a cut cable would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

from helpers import start_multitower
from multitower.cluster import network


class ClusterJob:
    """`multitower cluster ARGS` running; `lines` holds (monotonic time, stdout line)."""

    def __init__(self, *args, env=None):
        self.process = start_multitower("cluster", *args, env=env)
        self.lines: list[tuple[float, str]] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.process.stdout, self._out), daemon=True),
                         threading.Thread(target=self._read, args=(self.process.stderr, self.err.append),
                                          daemon=True)]
        for reader in self._readers:
            reader.start()

    def _out(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))

    @staticmethod
    def _read(stream, keep) -> None:
        for line in stream:
            keep(line.rstrip("\n"))

    @property
    def run_id(self) -> str:
        """The cluster's run id, from its first line (waits for it)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for _, line in self.lines:
                found = re.match(r"cluster ([0-9a-f]{8}):", line)
                if found:
                    return found.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"the cluster ended before it started: {self.err[-5:]}")
            time.sleep(0.1)
        raise AssertionError("no cluster line in 120 s")

    def namespace(self, node: int) -> str:
        return f"{network.PREFIX}{self.run_id}-n{node}"

    def wait(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def out(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first_line_at(self, pattern: str) -> float | None:
        """When the first stdout line matching `pattern` came (monotonic), or None."""
        return next((at for at, line in self.lines if re.search(pattern, line)), None)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(namespace: str) -> list[int]:
    """The training processes of a node: its launcher's children (not the launcher itself)."""
    return [pid for pid in network.namespace_pids(namespace)
            if "multitower train" in _cmdline(pid) and "multitower.cluster.agent" not in _cmdline(pid)]


def environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    except OSError:
        return {}
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_workers(job: ClusterJob, node: int) -> list[int]:
    """SIGKILL the node's training processes: the machine crashes them, its launcher stays."""
    pids = worker_pids(job.namespace(node))
    kill(pids)
    return pids


def kill_node(job: ClusterJob, node: int) -> list[int]:
    """SIGKILL everything on the node, its launcher included: the machine is gone."""
    pids = network.namespace_pids(job.namespace(node))
    kill(pids)
    return pids


def cut_link(job: ClusterJob, node: int) -> None:
    """Take the switch's port of the node's link down: its packets vanish without a word."""
    subprocess.run(["ip", "-n", f"{network.PREFIX}{job.run_id}-sw", "link", "set", f"n{node}", "down"], check=True)
