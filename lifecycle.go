package main

// The process lifecycle: what /ready and /health/startup know of it, and the
// graceful shutdown that drains the listeners.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// every calls fn every interval until ctx ends: the loop of each
// background job (the sweeper, the trim, the probe, key expiry, scheduled
// backups). The first call comes one interval after the start.
func every(ctx context.Context, interval time.Duration, fn func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// lifecycle is what /ready and /health/startup know about the process.
type lifecycle struct {
	started      atomic.Bool // the database is open and migrated, and the listeners are up
	shuttingDown atomic.Bool // a shutdown signal arrived

	streamsMu   sync.Mutex
	streamsDone chan struct{} // closed when long-lived streams must end
}

// ending returns a channel closed when the process ends its streams.
func (l *lifecycle) ending() <-chan struct{} {
	l.streamsMu.Lock()
	defer l.streamsMu.Unlock()
	if l.streamsDone == nil {
		l.streamsDone = make(chan struct{})
	}
	return l.streamsDone
}

// endStreams ends every change-feed stream, so the server can drain: a
// stream would otherwise hold its connection open past any timeout.
func (l *lifecycle) endStreams() {
	l.ending() // makes the channel
	l.streamsMu.Lock()
	defer l.streamsMu.Unlock()
	select {
	case <-l.streamsDone:
	default:
		close(l.streamsDone)
	}
}

// shutdown fails readiness, keeps serving for SHUTDOWN_DELAY so load
// balancers notice, then drains in-flight requests within SHUTDOWN_TIMEOUT.
// The caller's deferred closes then close Redis and SQLite.
func shutdown(life *lifecycle, servers []*http.Server, cfg *config, log *slog.Logger) error {
	life.shuttingDown.Store(true)
	life.endStreams() // a change-feed stream never finishes by itself
	log.Info("shutting down", "delay", cfg.ShutdownDelay.String(), "timeout", cfg.ShutdownTimeout.String())
	time.Sleep(cfg.ShutdownDelay)
	ctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	var errs []error
	for _, srv := range servers {
		if err := srv.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("drain: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("drained")
	return nil
}
