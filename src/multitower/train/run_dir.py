"""A run directory: one writer at a time, a status a reader can trust, no debris.

    runs/<name>/.lock        flock'ed by the one process writing the run (the launcher of a
                             multi-worker job, else rank 0); the kernel releases it when that
                             process dies, however it dies, so it cannot be left stuck
    runs/<name>/status.json  {"state", "step", "checkpoint_step", "message", "pid", "host", "updated"}:
                             "running" (step advances at every log line), "finished", "failed"
                             or "interrupted"; read it with `run_state`, which also tells a
                             "running" status whose writer died without a word
    runs/<name>/logs/        rank-<R>.log: the traceback of an unexpected error on rank R

What a crash mid-write leaves (a checkpoint's temporary file, a checkpoint the index
never named) is removed by `remove_leftovers` when the next writer takes the lock.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import traceback
from pathlib import Path

from multitower.config import RESUME_MAY_CHANGE, Config, flag_of
from multitower.errors import UserError
from multitower.files import atomic_write_bytes
from multitower.train.checkpoint import CheckpointDir

LOCK_NAME = ".lock"
STATUS_NAME = "status.json"
HELD_BY_LAUNCHER = "MULTITOWER_RUN_DIR_LOCKED"  # env: the launcher holds the lock for its workers
STATES = ("running", "finished", "failed", "interrupted")


class RunDirLock:
    """An exclusive, non-blocking flock on RUN_DIR/.lock, holding who took it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        """Take the lock (making the directory if needed), or raise a one-line UserError
        naming the process that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{self.run_dir} is in use by another multitower train ({holder or 'unknown process'}); "
                            f"wait for it to end, or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(run_dir: str | os.PathLike) -> bool:
    """Whether some process holds the run's lock now (a probe: takes and drops it)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write_status(run_dir: str | os.PathLike, state: str, step: int, checkpoint_step: int | None = None,
                 message: str | None = None) -> None:
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    body = {"state": state, "step": step, "checkpoint_step": checkpoint_step, "message": message,
            "pid": os.getpid(), "host": socket.gethostname(),
            "updated": datetime.datetime.now().isoformat(timespec="seconds")}
    atomic_write_bytes(Path(run_dir) / STATUS_NAME, json.dumps(body).encode())


def read_status(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / STATUS_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_state(run_dir: str | os.PathLike) -> str:
    """The run's state as a reader should believe it: status.json's, except that "running"
    without a live writer holding the lock is "stopped" (killed without a word, e.g. kill -9);
    "none" without a status."""
    status = read_status(run_dir)
    if status is None:
        return "none"
    if status.get("state") == "running" and not is_locked(run_dir):
        return "stopped"
    return status.get("state", "none")


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what a crash mid-write left: the run files' temporary copies (.config.json.tmp-<pid>,
    .status.json.tmp-<pid>) and the checkpoint directory's (CheckpointDir.remove_uncommitted).
    Call with the lock held. Returns what went."""
    run_dir = Path(run_dir)
    removed = [path for path in run_dir.glob(".*.tmp-*")]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed + CheckpointDir(run_dir / "checkpoints").remove_uncommitted()


def rank_log(run_dir: str | os.PathLike, rank: int) -> Path:
    """RUN_DIR/logs/rank-<rank>.log: what a rank has to say beyond one line."""
    return Path(run_dir) / "logs" / f"rank-{rank}.log"


def log_traceback(run_dir: str | os.PathLike, rank: int, exc: BaseException) -> Path | None:
    """Append `exc`'s traceback to RUN_DIR/logs/rank-<rank>.log; None where the run
    directory does not exist (an error before it was made)."""
    if not run_dir or not Path(run_dir).is_dir():
        return None
    path = rank_log(run_dir, rank)
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}\n")
            f.write("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path


def stored_config(run_dir: str | os.PathLike) -> Config | None:
    """The configuration a run was trained with (its config.json), or None where there is none."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except ValueError:
        raise UserError(f"{path} is unreadable; choose another --run-dir") from None


def check_run_dir(run_dir: str | os.PathLike, cfg: Config, strategy_class=None) -> None:
    """Refuse to touch a directory that is not ours to write: an existing run without
    --resume (the tutorial deletes train_dir; multitower never does), a resume that would
    change the run's trajectory, or a non-empty directory that is not a run."""
    run_dir = Path(run_dir)
    old = stored_config(run_dir)
    if old is not None:
        if not cfg.run.resume:
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it "
                            f"or choose another --run-dir")
        check_resume(run_dir, old, cfg, strategy_class)
    elif run_dir.exists() and (not run_dir.is_dir() or any(p.name not in (LOCK_NAME, "logs")
                                                             for p in run_dir.iterdir())):
        raise UserError(f"{run_dir} exists and is not a multitower run directory; choose another --run-dir")


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def _with_option_defaults(cfg: Config) -> Config:
    """cfg with its strategy's options complete (an option left at its default is the same
    setting as one typed at its default)."""
    from multitower.parallel import STRATEGIES, strategy_class
    if cfg.parallel.strategy not in STRATEGIES and cfg.parallel.strategy != "auto":
        return cfg
    options = dataclasses.asdict(strategy_class(cfg.parallel).options_of(cfg.parallel))
    return cfg.with_values({f"parallel.options.{k}": v for k, v in options.items()})


def check_resume(run_dir: Path, old: Config, new: Config, strategy_class=None) -> None:
    """A resume continues the same run: one-line UserError naming every setting it would
    change beyond config.RESUME_MAY_CHANGE and the strategy's resume_may_change (the
    model first, with its own message)."""
    old_model, new_model = old.model, new.model
    if (old_model.name, old_model.width, old_model.widths) != (new_model.name, new_model.width, new_model.widths):
        raise UserError(f"{run_dir} holds a run of model {old_model.name} (width {old_model.width}, widths "
                        f"{_shown(old_model.widths)}), not {new_model.name} (width {new_model.width}, widths "
                        f"{_shown(new_model.widths)})")
    may_change = set(RESUME_MAY_CHANGE) | {f"parallel.options.{name}" for name in
                                           getattr(strategy_class, "resume_may_change", ())}
    before, after = _with_option_defaults(old).flat(), _with_option_defaults(new).flat()
    paths = list(after) + [path for path in before if path not in after]
    changed = [path for path in paths
               if path not in may_change and path != "data.dir" and after.get(path) != before.get(path)]
    old_data, new_data = Path(old.data.dir).resolve(), Path(new.data.dir).resolve()
    if old_data != new_data and old_data.exists():
        changed.insert(0, "data.dir")
    if changed:
        was = ", ".join(f"{flag_of(p)} {_shown(before.get(p))}" for p in changed)
        now = ", ".join(f"{flag_of(p)} {_shown(after[p])}" for p in changed)
        raise UserError(f"{run_dir} was trained with {was}; --resume continues that run and cannot change "
                        f"it to {now}: drop those flags, or train into a new --run-dir")
