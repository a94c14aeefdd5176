"""Addresses the test cluster's parts agree on: loopback and the ``kubernetes`` Service.

What: the one address every component listens on (loopback), the range kube-apiserver
allocates ClusterIPs from, and the ClusterIP and port of the ``kubernetes`` Service.

Why a module of its own: the apiserver's flags (``controlplane.flags``), its serving
certificate (``controlplane.pki``), the ports and probes of ``controlplane.processes`` and the
node's CNI route and service proxy (``controlplane.nodeconfig``, ``controlplane.node``) must
name the same addresses; they all take them from here, so none imports another for a constant.
"""

from __future__ import annotations

LOOPBACK = "127.0.0.1"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service: the range's first address
KUBERNETES_SERVICE_PORT = 443
