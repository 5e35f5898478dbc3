//go:build race

package main

// raceEnabled is true when the tests are built with -race, which slows the
// transpiled SQLite about thirtyfold: tests sized for speed scale down.
const raceEnabled = true
