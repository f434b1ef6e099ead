//go:build tools

// The command this module builds, imported so that `go mod tidy` keeps what it needs.
package tools

import _ "go.etcd.io/etcd/server/v3"
