#!/usr/bin/env bash
# End-to-end test on a throwaway kind cluster, for machines with Docker (`make e2e-kind`):
#   1. creates a kind cluster (and installs the NFS client, nfs-common, on its nodes: the
#      kindest/node image does not ship it, see kubernetes-sigs/kind#1806),
#   2. runs an in-cluster NFS server: the Kubernetes project's own e2e test image
#      registry.k8s.io/e2e-test-images/volume/nfs (kernel nfsd, exports /exports with
#      `rw,fsid=0,insecure,no_root_squash`, so NFSv4 clients mount it as "/"), behind a
#      ClusterIP Service whose IP is the NFS_SERVER (nodes do not use cluster DNS for mounts),
#   3. builds the image from the Dockerfile and loads it into the cluster,
#   4. installs `manifests/` through a kustomize overlay that substitutes the NFS server
#      address, the export path and the image tag,
#   5. applies manifests/test-claim.yaml and test-pod.yaml, waits for the pod to succeed and
#      checks that SUCCESS landed in <namespace>-test-claim-<pv>/ on the export, then deletes
#      the claim and checks the directory was archived (archiveOnDelete "true"),
#   6. deletes the cluster (KEEP_CLUSTER=1 keeps it for debugging).
# Requirements: docker (a running engine), kind, kubectl (the repository's .venv/bin/kubectl is
# used when present), and a host kernel with the nfsd module loaded (`sudo modprobe nfsd`): the
# NFS server runs in a privileged container and uses the host kernel's NFS server. Docker Desktop
# and rootless Docker usually cannot do that.
# Settings: KIND_CLUSTER_NAME (nfs-provisioner-e2e), KIND_NODE_IMAGE (kind's default),
# NFS_SERVER_IMAGE, BUSYBOX_IMAGE, TIMEOUT seconds per wait (180), KEEP_CLUSTER (0).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER=${KIND_CLUSTER_NAME:-nfs-provisioner-e2e}
IMAGE_TAG=e2e
IMAGE=nfs-provisioner:${IMAGE_TAG}
NFS_SERVER_IMAGE=${NFS_SERVER_IMAGE:-registry.k8s.io/e2e-test-images/volume/nfs:1.4}
TIMEOUT=${TIMEOUT:-180}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
TEST_NS=nfs-e2e
NFS_NS=nfs-server
PROVISIONER_NS=nfs-provisioner

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'kind.sh: %s\n' "$*" >&2; exit 1; }

# --- refuse clearly when the tools are missing ----------------------------------------------
command -v docker >/dev/null 2>&1 \
  || die "docker is not installed; this test needs Docker (https://docs.docker.com/get-docker/)"
docker info >/dev/null 2>&1 \
  || die "docker is installed but its engine is not reachable (is the daemon running, may this user use it?)"
command -v kind >/dev/null 2>&1 \
  || die "kind is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
if [[ -n ${KUBECTL:-} ]]; then
  :
elif [[ -x $REPO/.venv/bin/kubectl ]]; then
  KUBECTL=$REPO/.venv/bin/kubectl
elif command -v kubectl >/dev/null 2>&1; then
  KUBECTL=kubectl
else
  die "kubectl is not installed (run \`make setup\`, or set KUBECTL=/path/to/kubectl)"
fi
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  die "a kind cluster named $CLUSTER already exists; delete it (kind delete cluster --name $CLUSTER) or set KIND_CLUSTER_NAME"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nfs-provisioner-e2e.XXXXXX")
KUBECONFIG_FILE=$WORK/kubeconfig # never touches ~/.kube/config
CREATED=0
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

diagnose() {
  say "diagnostics"
  k get pv,pvc,pods -A -o wide || true
  k -n "$TEST_NS" describe pvc test-claim || true
  k -n "$TEST_NS" describe pod test-pod || true
  k -n "$PROVISIONER_NS" describe deployment nfs-provisioner || true
  k -n "$PROVISIONER_NS" logs deployment/nfs-provisioner --all-containers --tail=200 || true
  k -n "$NFS_NS" logs pod/nfs-server --tail=50 || true
  k get events -A --sort-by=.lastTimestamp | tail -40 || true
}

finish() {
  local status=$?
  trap - EXIT
  if [[ $status -ne 0 && $CREATED -eq 1 ]]; then
    diagnose
  fi
  if [[ $CREATED -eq 1 ]]; then
    if [[ $KEEP_CLUSTER == 1 ]]; then
      say "keeping cluster $CLUSTER (KEEP_CLUSTER=1); kubeconfig: $KUBECONFIG_FILE"
    else
      say "deleting cluster $CLUSTER"
      kind delete cluster --name "$CLUSTER" || true
      rm -rf "$WORK"
    fi
  else
    rm -rf "$WORK"
  fi
  if [[ $status -eq 0 ]]; then
    say "PASS"
  else
    say "FAIL (exit $status)"
  fi
  exit "$status"
}
trap finish EXIT

# wait_phase KIND NAME NAMESPACE WANTED [FAILED]: poll .status.phase until WANTED; stop early on
# FAILED (a pod that exited 1 will never succeed) and after TIMEOUT seconds.
wait_phase() {
  local kind=$1 name=$2 ns=$3 want=$4 bad=${5:-} phase="" deadline=$((SECONDS + TIMEOUT))
  while ((SECONDS < deadline)); do
    phase=$(k -n "$ns" get "$kind" "$name" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [[ $phase == "$want" ]] && return 0
    [[ -n $bad && $phase == "$bad" ]] && die "$kind $ns/$name is $phase"
    sleep 2
  done
  die "timed out after ${TIMEOUT}s waiting for $kind $ns/$name to be $want (last phase: ${phase:-none})"
}

# --- 1. cluster ------------------------------------------------------------------------------
say "creating kind cluster $CLUSTER"
CREATED=1
kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" --wait 120s \
  ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}

for node in $(kind get nodes --name "$CLUSTER"); do
  grep -qw nfsd <(docker exec "$node" cat /proc/filesystems) \
    || die "the host kernel has no NFS server (nfsd) loaded; run \`sudo modprobe nfsd\` and retry"
  if ! docker exec "$node" sh -c 'test -x /sbin/mount.nfs || test -x /usr/sbin/mount.nfs'; then
    say "installing nfs-common on node $node"
    docker exec "$node" sh -c \
      'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nfs-common >/dev/null'
  fi
done

# --- 2. NFS server ---------------------------------------------------------------------------
say "starting the NFS server ($NFS_SERVER_IMAGE)"
k apply -f - <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: $NFS_NS
---
apiVersion: v1
kind: Pod
metadata:
  name: nfs-server
  namespace: $NFS_NS
  labels:
    app: nfs-server
spec:
  containers:
    - name: nfs-server
      image: $NFS_SERVER_IMAGE
      args: ["/exports"]
      securityContext:
        privileged: true # kernel nfsd
      ports:
        - {name: nfs, containerPort: 2049}
        - {name: mountd, containerPort: 20048}
        - {name: rpcbind, containerPort: 111}
      readinessProbe:
        tcpSocket:
          port: 2049
        periodSeconds: 2
      volumeMounts:
        - name: exports
          mountPath: /exports
  volumes:
    - name: exports
      emptyDir: {} # mode 0777: writable by the provisioner's uid 65534
---
apiVersion: v1
kind: Service
metadata:
  name: nfs-server
  namespace: $NFS_NS
spec:
  selector:
    app: nfs-server
  ports:
    - {name: nfs, port: 2049}
    - {name: mountd, port: 20048}
    - {name: rpcbind, port: 111}
YAML
k -n "$NFS_NS" wait --for=condition=Ready pod/nfs-server --timeout="${TIMEOUT}s"
NFS_IP=$(k -n "$NFS_NS" get service nfs-server -o jsonpath='{.spec.clusterIP}')
NFS_PATH=/ # fsid=0: the NFSv4 root of the server is its /exports
[[ -n $NFS_IP ]] || die "the nfs-server Service has no cluster IP"
say "NFS server at $NFS_IP:$NFS_PATH"

# --- 3. image --------------------------------------------------------------------------------
say "building $IMAGE"
docker build -t "$IMAGE" "$REPO"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# --- 4. install through an overlay ------------------------------------------------------------
# kustomize refuses absolute paths to bases, so the rendered manifests/ become a file resource.
mkdir -p "$WORK/overlay"
k kustomize "$REPO/manifests" >"$WORK/overlay/install.yaml"
cat >"$WORK/overlay/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - install.yaml
images:
  - name: nfs-provisioner
    newTag: "$IMAGE_TAG"
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: nfs-provisioner
        namespace: $PROVISIONER_NS
      spec:
        template:
          spec:
            containers:
              - name: nfs-provisioner
                env:
                  - name: NFS_SERVER
                    value: "$NFS_IP"
                  - name: NFS_PATH
                    value: "$NFS_PATH"
                  - name: LOG_LEVEL
                    value: DEBUG
            volumes:
              - name: nfs-client-root
                nfs:
                  server: "$NFS_IP"
                  path: "$NFS_PATH"
YAML
say "installing the provisioner: kubectl apply -k (manifests/ + overlay)"
k apply -k "$WORK/overlay"
k -n "$PROVISIONER_NS" rollout status deployment/nfs-provisioner --timeout="${TIMEOUT}s"

# --- 5. the seeds' smoke test ------------------------------------------------------------------
say "test-claim and test-pod in namespace $TEST_NS"
k create namespace "$TEST_NS"
k -n "$TEST_NS" apply -f "$REPO/manifests/test-claim.yaml"
wait_phase pvc test-claim "$TEST_NS" Bound
k -n "$TEST_NS" apply -f "$REPO/manifests/test-pod.yaml"
wait_phase pod test-pod "$TEST_NS" Succeeded Failed

PV=$(k -n "$TEST_NS" get pvc test-claim -o jsonpath='{.spec.volumeName}')
DIR=$TEST_NS-test-claim-$PV
PV_NFS=$(k get pv "$PV" -o jsonpath='{.spec.nfs.server}:{.spec.nfs.path}')
[[ $PV_NFS == "$NFS_IP:/$DIR" ]] || die "PV $PV points at $PV_NFS, expected $NFS_IP:/$DIR"
k -n "$NFS_NS" exec nfs-server -- test -f "/exports/$DIR/SUCCESS" \
  || die "SUCCESS is not in /exports/$DIR on the NFS server"
say "found /exports/$DIR/SUCCESS on the NFS server"

say "deleting the claim: the directory must be archived"
k -n "$TEST_NS" delete pod test-pod --wait=true
k -n "$TEST_NS" delete pvc test-claim --wait=true
deadline=$((SECONDS + TIMEOUT))
while k get pv "$PV" >/dev/null 2>&1; do
  ((SECONDS < deadline)) || die "timed out waiting for PV $PV to be deleted"
  sleep 2
done
k -n "$NFS_NS" exec nfs-server -- test -f "/exports/archived-$DIR/SUCCESS" \
  || die "/exports/archived-$DIR/SUCCESS is missing after the claim was deleted"
k -n "$NFS_NS" exec nfs-server -- test ! -e "/exports/$DIR" \
  || die "/exports/$DIR is still there after the claim was deleted"
say "found /exports/archived-$DIR/SUCCESS"
