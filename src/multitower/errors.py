"""The exception types for failures a user can act on, and the one-line form of any error."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits with
    status 2; no traceback. The message names the value and, where possible, the fix."""

    exit_status = 2


class PeerStopped(UserError):
    """Another process of the job stopped responding; the message names it."""


class PeerLost(UserError):
    """Another process of the job went away (its connection closed) without being named."""


class WorkerFailed(UserError):
    """A launched worker's failure, recorded for its launcher; the message is its one line."""


class Interrupted(UserError):
    """The job was stopped by a signal (Ctrl-C, SIGTERM); exit status 128 + the signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number


# What a worker killed by a signal most likely met (its launcher reports the bare signal):
# launch.failure_verdict on one machine, cluster/job.py for a node's.
SIGNAL_CAUSES = {"SIGKILL": "out of memory, or killed", "SIGBUS": "a bus error: a memory-mapped file shrank?",
                 "SIGSEGV": "a crash in native code", "SIGABRT": "aborted by native code"}


# Fragments of the messages gloo, NCCL, the TCPStore and rpc (TensorPipe) raise when a peer
# is gone or silent (torch 2.13); they arrive as RuntimeError (or torch's DistError).
_COMMUNICATION = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                  "connection refused", "connectfullmesh", "rpc ran for more than", "eof", "socket closed",
                  "peer", "nccl communicator was aborted", "recv", "send")


def is_communication_error(exc: BaseException) -> bool:
    """True for an error raised because another process of the job is gone or silent."""
    if isinstance(exc, UserError) or not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(fragment in text for fragment in _COMMUNICATION)


def first_line(message) -> str:
    """The meaningful line of an error message (which may be a dict from torch's error file
    or a traceback): a traceback's last line, otherwise the first, without "RuntimeError: "."""
    if isinstance(message, dict):
        message = message.get("message", str(message))
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "no message"
    last = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return last.removeprefix("RuntimeError: ").strip()
