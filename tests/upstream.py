"""nfs-subdir-external-provisioner's own ``deploy/`` manifests, and what ``check`` says of them.

An admin who swaps the image keeps these: ``deploy/rbac.yaml`` (no ``patch`` on
PersistentVolumes, nothing on namespaces), ``deploy/deployment.yaml`` (no securityContext, no
probes, no resources) and ``deploy/class.yaml``. Written out here once, as upstream ships them
(v4.0.2), for the e2e swap (tests/e2e/test_swap.py, the names as shipped) and the integration
test of the same RBAC (tests/integration/test_narrow_rbac.py, under fresh names:
``rbac_documents``). ``PATCH_RULE`` and ``NAMESPACE_RULE`` are the rules ``check`` must print
for the two permissions this RBAC lacks.
"""

from __future__ import annotations

from typing import Any

import yaml

# nfs-subdir-external-provisioner's deploy/rbac.yaml, as shipped (v4.0.2).
UPSTREAM_RBAC = """\
apiVersion: v1
kind: ServiceAccount
metadata:
  name: nfs-client-provisioner
  # replace with namespace where provisioner is deployed
  namespace: default
---
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: nfs-client-provisioner-runner
rules:
  - apiGroups: [""]
    resources: ["nodes"]
    verbs: ["get", "list", "watch"]
  - apiGroups: [""]
    resources: ["persistentvolumes"]
    verbs: ["get", "list", "watch", "create", "delete"]
  - apiGroups: [""]
    resources: ["persistentvolumeclaims"]
    verbs: ["get", "list", "watch", "update"]
  - apiGroups: ["storage.k8s.io"]
    resources: ["storageclasses"]
    verbs: ["get", "list", "watch"]
  - apiGroups: [""]
    resources: ["events"]
    verbs: ["create", "update", "patch"]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: run-nfs-client-provisioner
subjects:
  - kind: ServiceAccount
    name: nfs-client-provisioner
    # replace with namespace where provisioner is deployed
    namespace: default
roleRef:
  kind: ClusterRole
  name: nfs-client-provisioner-runner
  apiGroup: rbac.authorization.k8s.io
---
kind: Role
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: leader-locking-nfs-client-provisioner
  # replace with namespace where provisioner is deployed
  namespace: default
rules:
  - apiGroups: [""]
    resources: ["endpoints"]
    verbs: ["get", "list", "watch", "create", "update", "patch"]
---
kind: RoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: leader-locking-nfs-client-provisioner
  # replace with namespace where provisioner is deployed
  namespace: default
subjects:
  - kind: ServiceAccount
    name: nfs-client-provisioner
    # replace with namespace where provisioner is deployed
    namespace: default
roleRef:
  kind: Role
  name: leader-locking-nfs-client-provisioner
  apiGroup: rbac.authorization.k8s.io
"""

# deploy/class.yaml, as shipped.
UPSTREAM_CLASS = """\
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: nfs-client
# or choose another name, must match deployment's env PROVISIONER_NAME'
provisioner: k8s-sigs.io/nfs-subdir-external-provisioner
parameters:
  archiveOnDelete: "false"
"""


def upstream_deployment(image: str, server: str, path: str) -> str:
    """deploy/deployment.yaml, as shipped but for the three values every user edits."""
    return f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: nfs-client-provisioner
  labels:
    app: nfs-client-provisioner
  # replace with namespace where provisioner is deployed
  namespace: default
spec:
  replicas: 1
  strategy:
    type: Recreate
  selector:
    matchLabels:
      app: nfs-client-provisioner
  template:
    metadata:
      labels:
        app: nfs-client-provisioner
    spec:
      serviceAccountName: nfs-client-provisioner
      containers:
        - name: nfs-client-provisioner
          # upstream: registry.k8s.io/sig-storage/nfs-subdir-external-provisioner:v4.0.2
          image: {image}
          volumeMounts:
            - name: nfs-client-root
              mountPath: /persistentvolumes
          env:
            - name: PROVISIONER_NAME
              value: k8s-sigs.io/nfs-subdir-external-provisioner
            - name: NFS_SERVER
              # upstream: 10.3.243.101
              value: "{server}"
            - name: NFS_PATH
              # upstream: /ifs/kubernetes
              value: "{path}"
      volumes:
        - name: nfs-client-root
          nfs:
            # upstream: 10.3.243.101
            server: "{server}"
            # upstream: /ifs/kubernetes
            path: "{path}"
"""


# What `check` prints for the two wanted permissions nfs-subdir's RBAC does not grant.
PATCH_RULE = """\
  # ClusterRole
  - apiGroups: [""]
    resources: ["persistentvolumes"]
    verbs: ["patch"]"""
NAMESPACE_RULE = """\
  # ClusterRole
  - apiGroups: [""]
    resources: ["namespaces"]
    resourceNames: ["kube-system"]
    verbs: ["get"]"""


def rbac_documents(name: str, namespace: str) -> list[dict[str, Any]]:
    """``UPSTREAM_RBAC`` with every object named ``name`` and everything namespaced (the
    ServiceAccount, the Role and their bindings' subjects) in ``namespace``."""
    documents = [doc for doc in yaml.safe_load_all(UPSTREAM_RBAC) if doc]
    for doc in documents:
        doc["metadata"]["name"] = name
        if "namespace" in doc["metadata"]:
            doc["metadata"]["namespace"] = namespace
        if "roleRef" in doc:
            doc["roleRef"]["name"] = name
            doc["subjects"] = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    return documents
