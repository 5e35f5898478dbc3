package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"sync"
	"time"
)

// logWriter buffers log output and flushes it every interval, so the access
// log costs one write system call per batch of lines rather than per request
// (a fifth of a cached read's cost otherwise). Lines above INFO are flushed at
// once; at worst the last interval of INFO lines is lost if the process is
// killed. Close flushes what is left.
type logWriter struct {
	mu   sync.Mutex
	buf  *bufio.Writer
	stop context.CancelFunc
	done chan struct{}
}

func newLogWriter(w io.Writer, interval time.Duration) *logWriter {
	ctx, cancel := context.WithCancel(context.Background())
	lw := &logWriter{buf: bufio.NewWriterSize(w, 64<<10), stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(lw.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				lw.Flush()
			}
		}
	}()
	return lw
}

var infoLevel = []byte(`"level":"INFO"`)

func (lw *logWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	n, err := lw.buf.Write(p)
	if err == nil && !bytes.Contains(p[:min(len(p), 80)], infoLevel) {
		err = lw.buf.Flush()
	}
	return n, err
}

// Flush writes out what is buffered.
func (lw *logWriter) Flush() error {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.buf.Flush()
}

// Close stops the flusher and flushes.
func (lw *logWriter) Close() error {
	lw.stop()
	<-lw.done
	return lw.Flush()
}
