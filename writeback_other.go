//go:build !linux

package main

// syncGently fsyncs the file at path in one go: sync_file_range(2), which
// lets writeback_linux.go write a copy back a piece at a time, is Linux's;
// the service is built and deployed for Linux.
func syncGently(path string) error { return syncFile(path) }
