//go:build tools

// Package tools pins the etcd server program that this module builds (see
// ../k8s/README.md); it is never compiled into anything (build tag "tools").
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
