"""An emulated cluster on one host: `multitower cluster --nodes N --link RATE -- train ...`.

network.py makes the nodes (network namespaces on a shaped switch) and removes them;
job.py runs torch's launcher in each node, as torchrun would on real machines.
See docs/cluster.md.
"""

from multitower.cluster.job import run_cluster
from multitower.cluster.network import Network, parse_rate, remove_stale

__all__ = ["Network", "parse_rate", "remove_stale", "run_cluster"]
