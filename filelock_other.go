//go:build !unix

package main

// lockDatabase does nothing where flock(2) is missing: the service is built
// and deployed for Linux, where filelock.go takes the lock.
func lockDatabase(dbPath string) (release func(), err error) { return func() {}, nil }
