package main

import (
	"database/sql"
	"net/http"
	"strconv"
	"time"

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
	}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.requests, m.duration, m.inFlight, m.cacheRequests, m.localRequests,
		m.invalidations, m.breakerStates, m.breakerChanges, m.shed, m.rateLimited,
	)
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
