"""Which attempt of the job this worker belongs to: 0, then 1, 2, ... after each restart.

Workers of one attempt meet under a key prefix of their own in the launcher's store
(process groups, rpc, heartbeats), a restarted one resumes from the newest checkpoint, and
an injected fault fires in attempt 0 only: all of them need the same number on every node.

TORCHELASTIC_RESTART_COUNT is not that number across machines. torch's agent counts only
its own failures: when the workers of node 1 die, node 1's agent restarts with count 1,
but node 0's agent, whose workers were still healthy, restarts its group for the new
rendezvous round "without counting a retry" (torch 2.13, elastic/agent/server/api.py,
_invoke_run: "membership changes do not count as retries") and starts them with count 0.
The two halves then waited under different prefixes until --timeout (seen on a 2-node
sync job killed at step 15). The cluster's agent (cluster/agent.py) sets MULTITOWER_ATTEMPT
from the rendezvous round instead; one machine's launcher has one agent, whose count is
the attempt.
"""

from __future__ import annotations

import os

ATTEMPT_ENV = "MULTITOWER_ATTEMPT"


def current_attempt() -> int:
    """This worker's attempt number, the same on every node of the job (0 outside a launcher)."""
    return int(os.environ.get(ATTEMPT_ENV, os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
