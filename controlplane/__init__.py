"""A real local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager).

Test, demo and benchmark infrastructure only: the provisioner never imports it. The binaries
are built from the pinned Go modules in this directory by ``build.sh``; ``runner`` resolves
them, starts them on loopback with their own certificates and stops them again.
"""
