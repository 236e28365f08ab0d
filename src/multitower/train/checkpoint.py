"""Checkpoints: written atomically, checksummed, loaded without executing code.

Layout inside a run directory:
    checkpoints/step-00001000.pt   one torch.save'd dict of tensors, numbers and strings
    checkpoints/index.json         the kept checkpoints, oldest first, each with its SHA-256

A checkpoint exists only once index.json names it: the .pt file is written to a
temporary name, fsynced and renamed first, then the index is replaced the same way.
A crash at any point leaves the previous index, and so the previous checkpoint, intact.
Loading uses torch.load(weights_only=True), which refuses pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitower.errors import UserError
from multitower.files import atomic_write_bytes, replacing

FORMAT_VERSION = 1
INDEX_NAME = "index.json"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CheckpointEntry:
    step: int
    file: str
    sha256: str


class CheckpointDir:
    """The checkpoints of one run. Only rank 0 constructs one for writing."""

    def __init__(self, directory: str | os.PathLike, keep: int = 5):
        self.directory = Path(directory)
        self.keep = keep

    # -- index -----------------------------------------------------------------
    def entries(self) -> list[CheckpointEntry]:
        """Checkpoints named by the index, oldest first ([] when there are none)."""
        index = self.directory / INDEX_NAME
        if not index.exists():
            return []
        try:
            raw = json.loads(index.read_text())
            return [CheckpointEntry(int(e["step"]), str(e["file"]), str(e["sha256"])) for e in raw["checkpoints"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"checkpoint index {index} is unreadable ({exc}); restore it or start a new run") from None

    def _write_index(self, entries: list[CheckpointEntry]) -> None:
        body = {"format_version": FORMAT_VERSION,
                "checkpoints": [e.__dict__ for e in entries]}
        atomic_write_bytes(self.directory / INDEX_NAME, json.dumps(body, indent=1).encode())

    def latest_step(self) -> int | None:
        entries = self.entries()
        return entries[-1].step if entries else None

    # -- save ------------------------------------------------------------------
    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write `state` as the checkpoint of `step`, then drop the oldest beyond `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}.pt"
        path = self.directory / name
        previous = self.entries()
        try:
            with replacing(path) as tmp:
                torch.save({**state, "format_version": FORMAT_VERSION, "step": step}, tmp)
                sha = _sha256_file(tmp)
            entries = [e for e in previous if e.step != step] + [CheckpointEntry(step, name, sha)]
            entries.sort(key=lambda e: e.step)
            kept, dropped = entries[-self.keep:], entries[:-self.keep]
            self._write_index(kept)
        except (OSError, RuntimeError) as exc:
            # ENOSPC and friends: OSError from our own writes, RuntimeError from torch.save's
            # zip writer ("PytorchStreamWriter failed writing file ..."). The index still
            # names only the earlier checkpoints.
            if not any(e.step == step for e in previous):
                path.unlink(missing_ok=True)
            latest = f"step {previous[-1].step}" if previous else "none"
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
            raise UserError(f"could not write the checkpoint of step {step} to {self.directory}: "
                            f"{reason}; earlier checkpoints are intact (latest: {latest})") from None
        for entry in dropped:  # only after the new index no longer names them
            (self.directory / entry.file).unlink(missing_ok=True)
        return path

    def remove_uncommitted(self) -> list[Path]:
        """Delete temporary files (.step-*.pt.tmp-<pid>, .index.json.tmp-<pid>) and
        step-*.pt files the index does not name: what a crash mid-save leaves. Only the run's
        one writer may call it (it holds the run directory's lock). Returns what went."""
        if not self.directory.is_dir():
            return []
        named = {entry.file for entry in self.entries()}
        removed = []
        for path in self.directory.iterdir():
            temporary = path.name.startswith(".") and ".tmp-" in path.name
            uncommitted = path.name.startswith("step-") and path.suffix == ".pt" and path.name not in named
            if temporary or uncommitted:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # -- load ------------------------------------------------------------------
    def load(self, step: int | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Load checkpoint `step` (default: the newest whose checksum verifies).

        A newest checkpoint that is truncated or corrupted is reported on stderr and the
        previous good one is used; an explicitly requested bad one is an error."""
        entries = self.entries()
        if not entries:
            raise UserError(f"no checkpoint in {self.directory}")
        if step is not None:
            chosen = [e for e in entries if e.step == step]
            if not chosen:
                raise UserError(f"no checkpoint of step {step} in {self.directory}; "
                                f"available: {[e.step for e in entries]}")
            return self._load_entry(chosen[0], map_location)
        errors = []
        for entry in reversed(entries):
            try:
                return self._load_entry(entry, map_location)
            except UserError as exc:
                errors.append(str(exc))
                print(f"warning: {exc}; falling back to the previous checkpoint", flush=True)
        raise UserError(f"no loadable checkpoint in {self.directory}: {errors[0]}")

    def _load_entry(self, entry: CheckpointEntry, map_location) -> dict[str, Any]:
        path = self.directory / entry.file
        if not path.exists():
            raise UserError(f"checkpoint {path} is missing")
        if _sha256_file(path) != entry.sha256:
            raise UserError(f"checkpoint {path} is corrupted (SHA-256 differs from {INDEX_NAME})")
        return load_checkpoint_file(path, map_location)


def load_checkpoint_file(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """torch.load with weights_only=True: tensors, numbers, strings, no code."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean "unreadable"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} is unreadable: {first_line}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a multitower checkpoint (format {FORMAT_VERSION})")
    return state
