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
import traceback
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
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


@record  # writes the worker's exception to the error file that the agent reports
def worker_main(config_json: str) -> dict:
    """One worker: its rank comes from the environment the agent set."""
    import json
    from multitower.train.loop import train
    try:
        result = train(Config.from_dict(json.loads(config_json)))
    except UserError as exc:
        # A user error needs no traceback: its message becomes the one line the user sees.
        raise RuntimeError(f"{exc}") from None
    except Exception:
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
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.parallel.processes(),
        run_id=f"multitower-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",  # loopback only
        rdzv_configs={"timeout": 120}, local_addr="127.0.0.1",
        max_restarts=cfg.parallel.max_restarts, monitor_interval=0.5, start_method="spawn")
    try:
        results = elastic_launch(launch_config, worker_main)(cfg.to_json())
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: the OOM killer, kill -9
            raise UserError(f"worker rank {rank} failed: killed by {failure.signal_name()} "
                            f"(out of memory, or killed)") from None
        raise UserError(f"worker rank {rank} failed: {first_line(failure.message)}") from None
    return results[0]


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
