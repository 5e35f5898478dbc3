package main

import (
	"database/sql"
	"net/http"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sony/gobreaker/v2"
)

// metrics holds the service's Prometheus series, registered on a registry
// built by run: there is no package-level registry.
type metrics struct {
	reg *prometheus.Registry

	requests       *prometheus.CounterVec
	duration       *prometheus.HistogramVec
	inFlight       prometheus.Gauge
	cacheRequests  *prometheus.CounterVec
	localRequests  *prometheus.CounterVec
	invalidations  prometheus.Counter
	breakerStates  *prometheus.GaugeVec
	breakerChanges *prometheus.CounterVec
	shed           prometheus.Counter
	rateLimited    prometheus.Counter
	reservations   *prometheus.CounterVec
	feedStreams    prometheus.Gauge
	feedLag        prometheus.Histogram
	fenceRounds    prometheus.Counter
	fenceWait      prometheus.Histogram
	changesApplied prometheus.Counter
	connsOpen      prometheus.Gauge
	connsRefused   *prometheus.CounterVec
	idleClosed     prometheus.Counter
	backupLast     prometheus.Gauge
	backupDuration prometheus.Gauge
	backupSize     prometheus.Gauge
	backupFailures prometheus.Counter
}

// newMetrics registers the service's series, and the Go runtime and process
// collectors, on reg. A nil reg gets a private registry.
func newMetrics(reg *prometheus.Registry) *metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		reg: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "http_requests_total",
			Help: "HTTP requests by method, route pattern and status code.",
		}, []string{"method", "route", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "http_request_duration_seconds",
			Help:    "HTTP request latency by method and route pattern.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"method", "route"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "http_requests_in_flight",
			Help: "HTTP requests being served.",
		}),
		cacheRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cache_requests_total",
			Help: "Redis cache lookups by result (hit, miss, error, skipped while its breaker is open).",
		}, []string{"result"}),
		localRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "local_cache_requests_total",
			Help: "In-process cache lookups by result (hit, miss).",
		}, []string{"result"}),
		invalidations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cache_invalidations_total",
			Help: "Redis entries replaced or tombstoned after a committed write.",
		}),
		breakerStates: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "circuit_breaker_state",
			Help: "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
		}, []string{"name"}),
		breakerChanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "circuit_breaker_transitions_total",
			Help: "Circuit breaker state changes.",
		}, []string{"name", "from", "to"}),
		shed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "http_requests_shed_total",
			Help: "Requests refused with 503 because MAX_IN_FLIGHT requests were already being served.",
		}),
		rateLimited: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "http_requests_rate_limited_total",
			Help: "Requests refused with 429 by the per-client rate limit.",
		}),
		reservations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "reservations_total",
			Help: "Reservations by the state they entered: held, confirmed, released, expired (by this process).",
		}, []string{"state"}),
		feedStreams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "feed_streams",
			Help: "Change-feed consumers following GET /events as Server-Sent Events.",
		}),
		feedLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "feed_delivery_lag_seconds",
			Help:    "Time from an event's commit to its delivery to a stream consumer following the feed live.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 60},
		}),
		fenceRounds: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "read_fence_rounds_total",
			Help: "Change-log head queries made to fence cached reads (shared by the reads waiting at the time), and periodic looks; PostgreSQL only.",
		}),
		fenceWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "read_fence_wait_seconds",
			Help:    "Time a product read or listing waited for the change log to be applied up to the database's head; PostgreSQL only.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}),
		changesApplied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "changelog_events_applied_total",
			Help: "Change-log events (any replica's writes) applied to this process's caches; PostgreSQL only.",
		}),
		connsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "http_connections_open",
			Help: "TCP connections open on the API listener (MAX_CONNS bounds them).",
		}),
		connsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "http_connections_refused_total",
			Help: "TCP connections closed unanswered as they were accepted, by the limit they were over: max_conns or max_conns_per_ip.",
		}, []string{"reason"}),
		idleClosed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "http_idle_connections_closed_total",
			Help: "Idle keep-alive connections closed early because the API listener held over 80% of MAX_CONNS.",
		}),
		backupLast: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "backup_last_success_timestamp_seconds",
			Help: "When the last successful backup was taken (Unix time; 0: none since the start); SQLite only.",
		}),
		backupDuration: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "backup_last_duration_seconds",
			Help: "How long the last successful backup took, from snapshot to rename; SQLite only.",
		}),
		backupSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "backup_last_size_bytes",
			Help: "The size of the last successful backup; SQLite only.",
		}),
		backupFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "backup_failures_total",
			Help: "Backups that failed and left nothing under a final name; SQLite only.",
		}),
	}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.requests, m.duration, m.inFlight, m.cacheRequests, m.localRequests,
		m.invalidations, m.breakerStates, m.breakerChanges, m.shed, m.rateLimited,
		m.reservations, m.feedStreams, m.feedLag, m.fenceRounds, m.fenceWait, m.changesApplied,
		m.connsOpen, m.connsRefused, m.idleClosed,
		m.backupLast, m.backupDuration, m.backupSize, m.backupFailures,
	)
	m.connsRefused.WithLabelValues("max_conns")
	m.connsRefused.WithLabelValues("max_conns_per_ip")
	for _, s := range []string{StateHeld, StateConfirmed, StateReleased, StateExpired} {
		m.reservations.WithLabelValues(s)
	}
	for _, r := range []string{cacheHit, cacheMiss, cacheError, cacheSkipped} {
		m.cacheRequests.WithLabelValues(r)
	}
	m.localRequests.WithLabelValues("hit")
	m.localRequests.WithLabelValues("miss")
	return m
}

// handler serves the registry in the Prometheus exposition format.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

func (m *metrics) cacheRequest(result string) { m.cacheRequests.WithLabelValues(result).Inc() }

func (m *metrics) localCache(hit bool) {
	if hit {
		m.localRequests.WithLabelValues("hit").Inc()
	} else {
		m.localRequests.WithLabelValues("miss").Inc()
	}
}

func (m *metrics) cacheInvalidation() { m.invalidations.Inc() }

func (m *metrics) backupDone(man backupManifest) {
	m.backupLast.Set(float64(man.CreatedAt.UnixMilli()) / 1000)
	m.backupDuration.Set(float64(man.DurationMS) / 1000)
	m.backupSize.Set(float64(man.Size))
}

func (m *metrics) backupFailed() { m.backupFailures.Inc() }

func breakerValue(s gobreaker.State) float64 {
	switch s {
	case gobreaker.StateHalfOpen:
		return 1
	case gobreaker.StateOpen:
		return 2
	}
	return 0
}

func (m *metrics) breakerState(name string, s gobreaker.State) {
	m.breakerStates.WithLabelValues(name).Set(breakerValue(s))
}

func (m *metrics) breakerTransition(name string, from, to gobreaker.State) {
	m.breakerState(name, to)
	m.breakerChanges.WithLabelValues(name, from.String(), to.String()).Inc()
}

// productsStored exposes the store's maintained product count. It is a
// gauge, so its name has no _total (Prometheus keeps that for counters).
func (m *metrics) productsStored(count func() int64) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "products_stored",
		Help: "Products in the catalog (a maintained count, not a query).",
	}, func() float64 { return float64(count()) }))
}

// cacheBytes exposes the bytes held by the in-process product and page
// caches, which CACHE_MEMORY bounds together.
func (m *metrics) cacheBytes(local, pages func() int64) {
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "local_cache_bytes",
			Help: "Bytes held by the in-process product cache (half of CACHE_MEMORY at most).",
		}, func() float64 { return float64(local()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "page_cache_bytes",
			Help: "Bytes held by the in-process listing page cache (half of CACHE_MEMORY at most).",
		}, func() float64 { return float64(pages()) }),
	)
}

// dbPools registers the collectors of the store's connection pools: for a
// database/sql pool, sqlPoolCollector. Any prometheus.Collector will do, so
// an engine with its own pool type (pgxpool) brings its own.
func (m *metrics) dbPools(cs ...prometheus.Collector) {
	m.reg.MustRegister(cs...)
}

// sqlPoolCollector is client_golang's maintained database/sql collector:
// the go_sql_* series, labelled db_name=name.
func sqlPoolCollector(db *sql.DB, name string) prometheus.Collector {
	return collectors.NewDBStatsCollector(db, name)
}

// writeGroups exposes the group commit: transactions committed and the
// writes they carried.
func (m *metrics) writeGroups(stats func() (groups, writes int64)) {
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "db_write_groups_total",
			Help: "Write transactions committed by the group-commit writer (one fsync each).",
		}, func() float64 { g, _ := stats(); return float64(g) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "db_group_writes_total",
			Help: "Writes committed in those transactions; divided by db_write_groups_total, the average group size.",
		}, func() float64 { _, w := stats(); return float64(w) }),
	)
}

// observe records one finished request.
func (m *metrics) observe(method, route string, status int, elapsed time.Duration) {
	switch method {
	case "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS":
	default:
		method = "OTHER" // clients choose methods: keep the label set bounded
	}
	m.requests.WithLabelValues(method, route, strconv.Itoa(status)).Inc()
	m.duration.WithLabelValues(method, route).Observe(elapsed.Seconds())
}

// pgPoolCollector exposes the PostgreSQL connection pool's statistics at
// scrape time.
type pgPoolCollector struct{ stat func() *pgxpool.Stat }

var (
	pgMaxDesc     = prometheus.NewDesc("pgxpool_max_connections", "Maximum PostgreSQL connections in the pool.", nil, nil)
	pgTotalDesc   = prometheus.NewDesc("pgxpool_connections", "Open PostgreSQL connections by state.", []string{"state"}, nil)
	pgAcqDesc     = prometheus.NewDesc("pgxpool_acquires_total", "Connections acquired from the pool.", nil, nil)
	pgEmptyDesc   = prometheus.NewDesc("pgxpool_empty_acquires_total", "Acquires that had to wait for a connection.", nil, nil)
	pgWaitDesc    = prometheus.NewDesc("pgxpool_acquire_wait_seconds_total", "Time spent waiting for a connection.", nil, nil)
	pgCancelDesc  = prometheus.NewDesc("pgxpool_canceled_acquires_total", "Acquires abandoned by their caller.", nil, nil)
	pgNewConnDesc = prometheus.NewDesc("pgxpool_new_connections_total", "Connections opened.", nil, nil)
)

func (c pgPoolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{pgMaxDesc, pgTotalDesc, pgAcqDesc, pgEmptyDesc, pgWaitDesc, pgCancelDesc, pgNewConnDesc} {
		ch <- d
	}
}

func (c pgPoolCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stat()
	ch <- prometheus.MustNewConstMetric(pgMaxDesc, prometheus.GaugeValue, float64(s.MaxConns()))
	ch <- prometheus.MustNewConstMetric(pgTotalDesc, prometheus.GaugeValue, float64(s.AcquiredConns()), "acquired")
	ch <- prometheus.MustNewConstMetric(pgTotalDesc, prometheus.GaugeValue, float64(s.IdleConns()), "idle")
	ch <- prometheus.MustNewConstMetric(pgTotalDesc, prometheus.GaugeValue, float64(s.ConstructingConns()), "constructing")
	ch <- prometheus.MustNewConstMetric(pgAcqDesc, prometheus.CounterValue, float64(s.AcquireCount()))
	ch <- prometheus.MustNewConstMetric(pgEmptyDesc, prometheus.CounterValue, float64(s.EmptyAcquireCount()))
	ch <- prometheus.MustNewConstMetric(pgWaitDesc, prometheus.CounterValue, s.AcquireDuration().Seconds())
	ch <- prometheus.MustNewConstMetric(pgCancelDesc, prometheus.CounterValue, float64(s.CanceledAcquireCount()))
	ch <- prometheus.MustNewConstMetric(pgNewConnDesc, prometheus.CounterValue, float64(s.NewConnsCount()))
}

// reservation counts a reservation entering state.
func (m *metrics) reservation(state string) { m.reservations.WithLabelValues(state).Inc() }

// delivered observes the lag of an event delivered now.
func (m *metrics) delivered(occurred time.Time) { m.feedLag.Observe(time.Since(occurred).Seconds()) }

// relayMetrics are the relay's series, registered when the relay is on.
type relayMetrics struct {
	published prometheus.Counter
	confirm   prometheus.Histogram
	backlog   prometheus.Gauge
	oldestAge prometheus.Gauge
	returned  prometheus.Counter
	failures  *prometheus.CounterVec
	leader    prometheus.Gauge
	brokerUp  prometheus.Gauge
}

// Relay failure reasons.
const (
	relayFailConnect = "connect" // the broker could not be reached, or refused the session
	relayFailPublish = "publish" // a publish failed, was nacked or not confirmed in time
	relayFailStore   = "store"   // the database failed a read or a position update
	relayFailLease   = "lease"   // the relay lost its lease, or another relay moved its position
	relayFailTrimmed = "trimmed" // retention deleted events before they were published
)

// relay registers the relay's series on m's registry.
func (m *metrics) relay() *relayMetrics {
	r := &relayMetrics{
		published: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_events_published_total",
			Help: "Change-feed events the broker confirmed (re-sends after a failure count again).",
		}),
		confirm: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "relay_confirm_seconds",
			Help:    "Time from publishing a batch of events to the broker's confirm of all of them.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		backlog: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_backlog_events",
			Help: "Change-feed events not yet confirmed by the broker (head less the relay's position), as this replica last saw it.",
		}),
		oldestAge: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_oldest_unpublished_age_seconds",
			Help: "Age of the oldest change-feed event not yet confirmed by the broker (0: none).",
		}),
		returned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_returned_total",
			Help: "Events the broker returned as unroutable (no queue bound for their type); they are passed over.",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_failures_total",
			Help: "Relay failures by reason (connect, publish, store, lease, trimmed); after each the relay re-sends from its position.",
		}, []string{"reason"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_leader",
			Help: "1 while this replica holds the relay's lease and publishes.",
		}),
		brokerUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_broker_up",
			Help: "1 while this replica's relay is connected to the broker.",
		}),
	}
	m.reg.MustRegister(r.published, r.confirm, r.backlog, r.oldestAge, r.returned, r.failures, r.leader, r.brokerUp)
	for _, reason := range []string{relayFailConnect, relayFailPublish, relayFailStore, relayFailLease, relayFailTrimmed} {
		r.failures.WithLabelValues(reason)
	}
	return r
}
