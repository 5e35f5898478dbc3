//go:build unix

package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// lockDatabase takes an exclusive lock on dbPath + ".lock" for the life of
// the process and records the process id in it. Every in-process cache and
// the maintained product count assume that one process owns the file, so a
// second process on the same file must refuse to start.
//
// The lock is flock(2) on a file of its own rather than a lock on the
// database: SQLite takes POSIX record locks on the database file, and POSIX
// locks are per process and dropped when any descriptor of the file closes,
// so a lock of ours there would interfere with SQLite's and be lost to it.
// The kernel drops a flock when its holder exits, however it exits: a stale
// lock file never blocks a restart. The file is left in place on release;
// removing it would let a third process lock a new file while a second
// still holds the old one.
//
// It returns an error naming dbPath and the holder if the lock is taken.
func lockDatabase(dbPath string) (release func(), err error) {
	name := dbPath + ".lock"
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock database: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder := ""
		if b, rerr := os.ReadFile(name); rerr == nil {
			if pid, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil {
				holder = fmt.Sprintf(" (pid %d)", pid)
			}
		}
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, &configError{msg: fmt.Sprintf("DB_PATH %s is in use by another productsvc process%s; one process per database file", dbPath, holder)}
		}
		return nil, fmt.Errorf("lock database %s: %w", name, err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return func() { f.Close() }, nil // closing the last descriptor releases the flock
}
