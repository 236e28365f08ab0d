"""torchrun for the cluster's nodes: `python -m multitower.cluster.agent TORCHRUN-ARGS`.

torch's own launcher (torch.distributed.run.main) with torch's c10d rendezvous, plus one
thing: after each rendezvous round, the agent that became group rank 0 publishes how many
rounds it has joined, every agent reads it from that round's own store, and the workers it
then starts find it in MULTITOWER_ATTEMPT. So every worker of the job agrees on the attempt
number after a restart, which torch's per-agent TORCHELASTIC_RESTART_COUNT does not
(multitower/attempt.py says why). Group rank 0 is node 0 for the job's whole life: its
agent serves the rendezvous, without which no later round could be held.

Run with `--rdzv-backend multitower-rounds` (job.AGENT_BACKEND); every other torchrun argument is torch's.
"""

from __future__ import annotations

import itertools
import os
import sys

from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.run import main as torchrun_main

from multitower.attempt import ATTEMPT_ENV
from multitower.cluster.job import AGENT_BACKEND
_KEY = "multitower/attempt"  # in the round's own store (RendezvousInfo.store, prefixed by the round)


def rounds_handler(params: RendezvousParameters):
    """torch's c10d rendezvous handler whose next_rendezvous() also sets MULTITOWER_ATTEMPT."""
    backend, store = create_backend(params)
    params.backend = backend.name  # create_handler checks that the names match
    handler = create_handler(store, backend, params)
    join = handler.next_rendezvous
    joined = itertools.count()  # rounds this agent has joined

    def next_rendezvous():
        info = join()
        mine = next(joined)
        if info.rank == 0:
            info.store.set(_KEY, str(mine))
        # The agent's environment is copied into every worker it starts next (torch's
        # SubprocessHandler: os.environ, then the worker's own variables).
        os.environ[ATTEMPT_ENV] = info.store.get(_KEY).decode()
        return info

    handler.next_rendezvous = next_rendezvous
    return handler


def main(argv: list[str] | None = None) -> None:
    rendezvous_handler_registry.register(AGENT_BACKEND, rounds_handler)
    torchrun_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
