"""Processes of this machine as Linux's /proc shows them (no torch: the cluster's
supervisor reads them before torch is imported)."""

from __future__ import annotations


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after "(comm)": state, ppid, ...; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter ("R", "S", "T" stopped, "Z" exited, ...), or None once it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def parent_of(pid: int) -> int | None:
    """The parent's pid, or None once the process is gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[1]) if fields else None
    except (IndexError, ValueError):
        return None
