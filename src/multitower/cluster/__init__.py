"""An emulated cluster on one host: nodes as network namespaces on a shaped switch.

network.py makes the nodes and removes them. See docs/cluster.md.
"""

from multitower.cluster.network import Network, parse_rate, remove_stale

__all__ = ["Network", "parse_rate", "remove_stale"]
