//go:build !unix

package main

// openFileLimit has no RLIMIT_NOFILE to read here: the service is built and
// deployed for Linux, where connlimit_unix.go reads it.
func openFileLimit() int { return 10_000 }
