"""Processes of this machine as Linux's /proc shows them (no torch: the cluster's
supervisor reads them before torch is imported)."""

from __future__ import annotations


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat ("R", "S", "T" stopped, "Z" exited, ...), or None
    once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def parent_of(pid: int) -> int | None:
    """The parent's pid from /proc/PID/stat, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
