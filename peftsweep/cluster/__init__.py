"""Where a sweep runs: an embedded local Ray by default, or an existing cluster by address."""

from peftsweep.cluster.local import Disconnecting, check_multinode, cluster_resources, connect, disconnect

__all__ = ["Disconnecting", "check_multinode", "cluster_resources", "connect", "disconnect"]
