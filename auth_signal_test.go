package main

import "syscall"

// syscallSIGHUP is what run's signal handling receives on SIGHUP.
const syscallSIGHUP = syscall.SIGHUP
