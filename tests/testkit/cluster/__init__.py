"""A loopback Kubernetes cluster for tests: `from testkit.cluster import LoopbackCluster`.

The real `kubernetes` client (and kubectl) talk to it over HTTP on 127.0.0.1 through the
kubeconfig it writes; see cluster.py for the API and each module for what it emulates.
Test code only: never imported by the product.
"""

from .cluster import LoopbackCluster
from .errors import ApiError

__all__ = ["LoopbackCluster", "ApiError"]
