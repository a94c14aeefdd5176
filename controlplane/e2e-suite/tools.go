//go:build tools

// Package tools records what this module builds, so that `go mod tidy` keeps their
// requirements: Kubernetes' own end-to-end suite (e2e.test, its External Storage tests run
// against our StorageClass by `make e2e-storage`) and agnhost, the test image program those
// tests run in their pods. See ../build.sh.
package tools

import (
	_ "k8s.io/kubernetes/test/e2e"
	_ "k8s.io/kubernetes/test/images/agnhost"
)
