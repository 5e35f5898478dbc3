//go:build unix

package main

import "syscall"

// openFileLimit returns the process's open-file limit (RLIMIT_NOFILE).
// The Go runtime raises the soft limit to the hard one at start, so this
// is what the process may really open. An unlimited or unknown limit
// counts as 1<<20.
func openFileLimit() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<20 {
		return 1 << 20
	}
	return int(rl.Cur)
}
