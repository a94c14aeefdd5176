#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and etcd (and, on request,
# kube-scheduler and kubelet for the e2e node, and Kubernetes' e2e.test and
# agnhost for `make e2e-storage`) from the pinned Go modules in this directory
# (e2e-suite/ for the last two) into a cache outside the repository, keyed by
# version. A binary that is already cached is not rebuilt.
#
# usage: controlplane/build.sh [etcd] [kube-apiserver] [kube-controller-manager]
#                              [kube-scheduler] [kubelet] [e2e.test] [agnhost]
#        (no argument: etcd, kube-apiserver and kube-controller-manager, what
#        `make test` needs). Prints the cache's bin directory last.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kube_version="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$here/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' "$here/go.mod")"
cache_root="${NFS_PROVISIONER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nfs-provisioner}"
bin_dir="$cache_root/controlplane-${kube_version}-etcd-${etcd_version}/bin"
mkdir -p "$bin_dir"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(etcd kube-apiserver kube-controller-manager)
fi

export CGO_ENABLED=0 GOWORK=off GOTOOLCHAIN=local GOFLAGS=-mod=readonly

minor="${kube_version#v1.}"; minor="${minor%%.*}"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X '$pkg.gitVersion=$kube_version' -X '$pkg.gitMajor=1'"
  ldflags+=" -X '$pkg.gitMinor=$minor' -X '$pkg.gitTreeState=clean'"
  ldflags+=" -X '$pkg.buildDate=$build_date'"
done

kube_pkgs=()
for t in "${targets[@]}"; do
  if [ -x "$bin_dir/$t" ]; then
    echo "controlplane: $t $([ "$t" = etcd ] && echo "$etcd_version" || echo "$kube_version") cached in $bin_dir" >&2
    continue
  fi
  case "$t" in
    etcd)
      echo "controlplane: building etcd $etcd_version" >&2
      (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$bin_dir/etcd.tmp" go.etcd.io/etcd/server/v3)
      mv "$bin_dir/etcd.tmp" "$bin_dir/etcd" ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubelet)
      kube_pkgs+=("k8s.io/kubernetes/cmd/$t") ;;
    e2e.test)
      # Kubernetes' end-to-end suite, the test binary of k8s.io/kubernetes/test/e2e (about ten
      # minutes cold on two cores, sharing the compiled packages of the control plane).
      echo "controlplane: building e2e.test $kube_version" >&2
      (cd "$here/e2e-suite" && go test -c -trimpath -ldflags "$ldflags" -o "$bin_dir/e2e.test.tmp" k8s.io/kubernetes/test/e2e)
      mv "$bin_dir/e2e.test.tmp" "$bin_dir/e2e.test" ;;
    agnhost)
      echo "controlplane: building agnhost $kube_version" >&2
      (cd "$here/e2e-suite" && go build -trimpath -ldflags "-s -w" -o "$bin_dir/agnhost.tmp" k8s.io/kubernetes/test/images/agnhost)
      mv "$bin_dir/agnhost.tmp" "$bin_dir/agnhost" ;;
    *)
      echo "controlplane: unknown binary '$t'; expected etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, e2e.test or agnhost" >&2
      exit 2 ;;
  esac
done

if [ ${#kube_pkgs[@]} -gt 0 ]; then
  echo "controlplane: building ${kube_pkgs[*]##*/} $kube_version (a cold build takes tens of minutes)" >&2
  tmp="$bin_dir/.build.$$"
  mkdir -p "$tmp"
  # One invocation shares the compilation of the packages both commands use.
  (cd "$here" && go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$tmp/" "${kube_pkgs[@]}")
  mv "$tmp"/* "$bin_dir/"
  rmdir "$tmp"
fi
echo "$bin_dir"
