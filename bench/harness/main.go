// Command harness holds the small pieces of bench/run.sh that are awkward in
// bash. It generates no load itself (wrk does):
//
//	harness port                          print a free 127.0.0.1 TCP port
//	harness ready -url U -since NS [-pid P] [-timeout D]
//	                                      poll U until 200; print ms since NS (unix ns)
//	harness report -dir D [-o FILE]       parse wrk outputs listed in D/results.tsv,
//	                                      write the Markdown report to FILE and stdout
//	harness postgres                      start a throwaway PostgreSQL (durable settings)
//	                                      on 127.0.0.1, print "listening SVC_URL REF_URL FLEET_URL"
//	                                      (three empty databases), stop it on SIGTERM
//	harness cpu NAME=PID...               print "NAME SECONDS" per process: the CPU time of
//	                                      it and its descendants; then "machine SECONDS"
//	                                      (busy time of all CPUs) and "wall SECONDS"
//	harness feedlag -url U -token T -duration D [-o FILE]
//	                                      follow U/events as Server-Sent Events from the
//	                                      feed's current end for D; print the delivery lag
//	                                      (receive time - occurred_at) of the events seen
//	harness rabbitmq                      start a throwaway RabbitMQ server (internal/rabbittest;
//	                                      its directories under TMPDIR), print "listening AMQP_URL",
//	                                      stop it on SIGTERM
//	harness relaylag -amqp U -exchange X -duration D [-o FILE]
//	                                      consume everything the relay publishes to X for D
//	                                      through a queue of its own bound with "#"; print the
//	                                      lag (receive time - the CloudEvent's time) of each
//	                                      message's first delivery
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"productsvc/internal/pgtest"
)

func main() {
	if err := run(context.Background(), os.Args, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "harness:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) < 2 {
		return errors.New("usage: harness port|ready|report [flags]")
	}
	switch cmd, rest := args[1], args[2:]; cmd {
	case "port":
		return cmdPort(stdout)
	case "ready":
		return cmdReady(ctx, rest, stdout)
	case "report":
		return cmdReport(rest, stdout)
	case "postgres":
		return cmdPostgres(ctx, stdout)
	case "feedlag":
		return cmdFeedlag(ctx, rest, stdout)
	case "cpu":
		return cmdCPU(rest, stdout)
	case "rabbitmq":
		return cmdRabbitMQ(ctx, stdout)
	case "relaylag":
		return cmdRelaylag(ctx, rest, stdout)
	default:
		return fmt.Errorf("unknown command %q", cmd)
	}
}

func cmdPostgres(ctx context.Context, stdout io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv, err := pgtest.StartDurable()
	if err != nil {
		return err
	}
	defer srv.Stop()
	_, svc, err := srv.CreateDatabase(ctx)
	if err != nil {
		return err
	}
	_, ref, err := srv.CreateDatabase(ctx)
	if err != nil {
		return err
	}
	_, fleet, err := srv.CreateDatabase(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "listening %s %s %s\n", svc, ref, fleet)
	<-ctx.Done()
	return nil
}

func cmdPort(stdout io.Writer) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	_, err = fmt.Fprintln(stdout, ln.Addr().(*net.TCPAddr).Port)
	return err
}

// cmdReady polls the URL every 2ms and prints the time from -since (taken by
// the caller just before it started the server) to the first 200.
func cmdReady(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("ready", flag.ContinueOnError)
	url := fs.String("url", "", "URL to poll")
	since := fs.Int64("since", 0, "start time in unix nanoseconds")
	pid := fs.Int("pid", 0, "fail early if this process exits")
	timeout := fs.Duration("timeout", 60*time.Second, "give up after")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *since == 0 {
		*since = time.Now().UnixNano()
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	client := &http.Client{Timeout: time.Second}
	last := "no answer"
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, *url, nil)
		if err != nil {
			return err
		}
		if resp, err := client.Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				ms := float64(time.Now().UnixNano()-*since) / 1e6
				_, err := fmt.Fprintf(stdout, "%.1f\n", ms)
				return err
			}
			last = resp.Status
		}
		if *pid > 0 {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", *pid)); err != nil {
				return fmt.Errorf("%s: process %d exited before ready", *url, *pid)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not ready after %s (last: %s)", *url, *timeout, last)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// cmdFeedlag finds the end of the change feed (paging GET /events), prints
// "following after SEQ", then follows the feed as Server-Sent Events from
// there for -duration. For each event it takes the receive time minus the
// event's occurred_at (the service's clock: same host) and at the end prints
// one line: events=N p50_ms= p99_ms= max_ms= out_of_order=, also to -o.
func cmdFeedlag(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("feedlag", flag.ContinueOnError)
	base := fs.String("url", "", "service base URL")
	token := fs.String("token", "", "bearer token")
	duration := fs.Duration("duration", 10*time.Second, "how long to follow the feed")
	outPath := fs.String("o", "", "also write the summary line here")
	if err := fs.Parse(args); err != nil {
		return err
	}
	client := &http.Client{Timeout: 30 * time.Second}
	get := func(ctx context.Context, path string, hdr map[string]string, c *http.Client) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, *base+path, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+*token)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		return c.Do(req)
	}
	var after int64
	for page := 0; ; page++ {
		if page == 100000 {
			return errors.New("more than 100000 pages of events")
		}
		res, err := get(ctx, fmt.Sprintf("/events?after=%d&limit=1000", after), nil, client)
		if err != nil {
			return err
		}
		var body struct {
			NextAfter int64 `json:"next_after"`
		}
		err = json.NewDecoder(res.Body).Decode(&body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK || err != nil {
			return fmt.Errorf("GET /events?after=%d: %s %v", after, res.Status, err)
		}
		if body.NextAfter == after {
			break
		}
		after = body.NextAfter
	}
	fmt.Fprintf(stdout, "following after %d\n", after)

	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	res, err := get(ctx, "/events", map[string]string{"Accept": "text/event-stream", "Last-Event-ID": strconv.FormatInt(after, 10)}, &http.Client{})
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /events as a stream: %s", res.Status)
	}
	var lags []float64 // milliseconds
	outOfOrder := 0
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		received := time.Now()
		var e struct {
			Seq        int64     `json:"seq"`
			OccurredAt time.Time `json:"occurred_at"`
		}
		if err := json.Unmarshal([]byte(data), &e); err != nil {
			return fmt.Errorf("event %q: %w", data, err)
		}
		if e.Seq <= after {
			outOfOrder++
		}
		after = e.Seq
		lags = append(lags, float64(received.Sub(e.OccurredAt))/1e6)
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return fmt.Errorf("stream: %w", err)
	}
	slices.Sort(lags)
	pct := func(q float64) float64 {
		if len(lags) == 0 {
			return 0
		}
		return lags[min(len(lags)-1, max(0, int(math.Ceil(q*float64(len(lags))))-1))]
	}
	line := fmt.Sprintf("events=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f out_of_order=%d\n", len(lags), pct(0.50), pct(0.99), pct(1), outOfOrder)
	if *outPath != "" {
		if err := os.WriteFile(*outPath, []byte(line), 0o644); err != nil {
			return err
		}
	}
	_, err = io.WriteString(stdout, line)
	return err
}

// wrkRun is what one wrk output file says.
type wrkRun struct {
	reqPerSec     float64
	avg, p50, p99 float64 // milliseconds
	requests      int64
	errors        int64 // non-2xx/3xx responses plus socket errors
}

var (
	reRPS      = regexp.MustCompile(`(?m)^Requests/sec:\s+([0-9.]+)`)
	rePct      = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s|m|h)\s*$`)
	reAvg      = regexp.MustCompile(`(?m)^\s+Latency\s+([0-9.]+)(us|ms|s|m|h)\s`)
	reRequests = regexp.MustCompile(`(?m)^\s+(\d+) requests in`)
	reSocket   = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	reNon2xx   = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
)

func parseWrk(out []byte) (wrkRun, error) {
	var r wrkRun
	m := reRPS.FindSubmatch(out)
	if m == nil {
		return r, errors.New("no Requests/sec line")
	}
	r.reqPerSec, _ = strconv.ParseFloat(string(m[1]), 64)
	if m := reAvg.FindSubmatch(out); m != nil {
		r.avg = toMS(m[1], m[2])
	}
	for _, m := range rePct.FindAllSubmatch(out, -1) {
		v := toMS(m[2], m[3])
		if string(m[1]) == "50" {
			r.p50 = v
		} else {
			r.p99 = v
		}
	}
	if m := reRequests.FindSubmatch(out); m != nil {
		r.requests, _ = strconv.ParseInt(string(m[1]), 10, 64)
	}
	if m := reSocket.FindSubmatch(out); m != nil {
		for _, s := range m[1:] {
			n, _ := strconv.ParseInt(string(s), 10, 64)
			r.errors += n
		}
	}
	if m := reNon2xx.FindSubmatch(out); m != nil {
		n, _ := strconv.ParseInt(string(m[1]), 10, 64)
		r.errors += n
	}
	return r, nil
}

// toMS converts one of wrk's durations (number, unit) to milliseconds.
func toMS(num, unit []byte) float64 {
	v, _ := strconv.ParseFloat(string(num), 64)
	return v * map[string]float64{"us": 1e-3, "ms": 1, "s": 1e3, "m": 60e3, "h": 3600e3}[string(unit)]
}

// workloads lists the workloads in report order with what each sends and
// the reference its ratio is taken against.
var workloads = []struct {
	id, desc               string
	refServer, refWorkload string
}{
	{"a", "GET /products/{id}, random id 1..N", "refhttp", "a"},
	{"b", "GET /products?limit=20", "refsqlite", "a"},
	{"c", "GET /products?category=cat-NN&sort=-price_cents&limit=20, random category", "refsqlite", "a"},
	{"d", "GET /products?q=WORD&limit=20, random common word", "refsqlite", "a"},
	{"e", "POST /products, unique sku per request", "refsqlite", "e"},
	{"f", `POST /products/{1..4}/stock/adjustments {"delta":1} (4 hot rows)`, "refsqlite", "e"},
	{"g", "90% GET /products/{id} + 10% POST /products/{id}/stock/adjustments, random id 1..N", "refsqlite", "a"},
	{"h", "holds and confirms on 4 hot products: POST /reservations of 1 unit of product 1..4, then POST /reservations/{id}/confirm of the Location it answered; each request is one transition, so req/s = transitions/s (target ≥ 5,000 on SQLite)", "refsqlite", "e"},
	{"i", "the write load under a change-feed consumer: 50% POST /products + 50% POST /products/{id}/stock/adjustments, random id 1..N, while `harness feedlag` follows GET /events as Server-Sent Events (its lag is in the next table)", "refsqlite", "e"},
}

var serverOrder = append([]string{"refhttp", "refsqlite", "refpgx", "productsvc", "productsvc+redis", "productsvc+postgres"}, fleetServers...)

// reference returns the server and workload that srv's figure for w is
// compared with: on PostgreSQL the pgx reference stands where SQLite's
// does, and each storage reference's reads are compared with bare net/http.
func reference(srv, w, refServer, refWorkload string) (string, string) {
	onPostgres := srv == "productsvc+postgres" || srv == "refpgx" || slices.Contains(fleetServers, srv)
	switch {
	case (srv == "refsqlite" || srv == "refpgx") && w == "a":
		return "refhttp", "a"
	case onPostgres && refServer == "refsqlite":
		return "refpgx", refWorkload
	}
	return refServer, refWorkload
}

type key struct{ workload, server string }

type summary struct {
	n                int
	median, min, max float64
	p50, p99         float64
	errors, requests int64
	peakRSSKB        int64
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// readTSV returns the tab-separated fields of each non-empty line of path.
func readTSV(path string) ([][]string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var rows [][]string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if line := sc.Text(); strings.TrimSpace(line) != "" {
			rows = append(rows, strings.Split(line, "\t"))
		}
	}
	return rows, sc.Err()
}

func cmdReport(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("report", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory holding meta.tsv, startup.tsv, results.tsv, notes.txt")
	outPath := fs.String("o", "", "also write the report here")
	if err := fs.Parse(args); err != nil {
		return err
	}

	meta := map[string]string{}
	metaRows, err := readTSV(*dir + "/meta.tsv")
	if err != nil {
		return err
	}
	for _, r := range metaRows {
		if len(r) >= 2 {
			meta[r[0]] = r[1]
		}
	}

	// results.tsv: workload, server, repeat, wrk output file, VmHWM kB.
	rows, err := readTSV(*dir + "/results.tsv")
	if err != nil {
		return err
	}
	type acc struct {
		rps, p50, p99    []float64
		errors, requests int64
		peak             int64
	}
	accs := map[key]*acc{}
	var parseProblems []string
	for _, r := range rows {
		if len(r) < 5 {
			continue
		}
		k := key{r[0], r[1]}
		out, err := os.ReadFile(r[3])
		if err != nil {
			return err
		}
		w, err := parseWrk(out)
		if err != nil {
			parseProblems = append(parseProblems, fmt.Sprintf("%s on %s, repeat %s: %v", k.workload, k.server, r[2], err))
			continue
		}
		a := accs[k]
		if a == nil {
			a = &acc{}
			accs[k] = a
		}
		a.rps = append(a.rps, w.reqPerSec)
		a.p50 = append(a.p50, w.p50)
		a.p99 = append(a.p99, w.p99)
		a.errors += w.errors
		a.requests += w.requests
		if kb, _ := strconv.ParseInt(r[4], 10, 64); kb > a.peak {
			a.peak = kb
		}
	}
	sums := map[key]summary{}
	for k, a := range accs {
		sums[k] = summary{
			n: len(a.rps), median: median(a.rps), min: slices.Min(a.rps), max: slices.Max(a.rps),
			p50: median(a.p50), p99: median(a.p99), errors: a.errors, requests: a.requests, peakRSSKB: a.peak,
		}
	}

	var b strings.Builder
	fmt.Fprintf(&b, "# productsvc benchmark\n\n")
	for _, f := range []struct{ label, key string }{
		{"Date", "date"}, {"Host", "uname"}, {"CPU", "cpu"}, {"Go", "go"}, {"Load generator", "wrk"},
		{"Settings", "settings"}, {"Data", "data"}, {"HAProxy", "haproxy"}, {"RabbitMQ", "rabbitmq"},
	} {
		if v := meta[f.key]; v != "" {
			fmt.Fprintf(&b, "- %s: %s\n", f.label, v)
		}
	}

	startup, err := readTSV(*dir + "/startup.tsv")
	if err != nil {
		return err
	}
	if len(startup) > 0 {
		fmt.Fprintf(&b, "\n## Footprint and startup\n\n")
		fmt.Fprintf(&b, "| server | binary size | start to ready | idle RSS | note |\n|---|---:|---:|---:|---|\n")
		for _, r := range startup {
			r = append(r, make([]string, 5)...)
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r[0], mb(r[1]), orDash(r[2], " ms"), mbKB(r[3]), r[4])
		}
	}

	fmt.Fprintf(&b, "\n## Throughput and latency\n\n")
	fmt.Fprintf(&b, "req/s is the median of the repeats, spread is min–max; p50/p99 are medians of the repeats' wrk --latency percentiles; errors are non-2xx/3xx responses plus socket errors summed over all repeats; peak RSS is the server's VmHWM after the workload.\n\n")
	fmt.Fprintf(&b, "| workload | server | req/s median | spread | p50 | p99 | errors | peak RSS | ratio to reference |\n")
	fmt.Fprintf(&b, "|---|---|---:|---:|---:|---:|---:|---:|---|\n")
	for _, w := range workloads {
		for _, srv := range serverOrder {
			s, ok := sums[key{w.id, srv}]
			if !ok {
				continue
			}
			ratio := "—"
			refServer, refWorkload := reference(srv, w.id, w.refServer, w.refWorkload)
			if srv != refServer || w.id != refWorkload {
				if ref, ok := sums[key{refWorkload, refServer}]; ok && ref.median > 0 {
					ratio = fmt.Sprintf("%.2f× %s (%s)", s.median/ref.median, refServer, refWorkload)
				}
			}
			if srv == "refhttp" || ((srv == "refsqlite" || srv == "refpgx") && w.id == "e") {
				ratio = "reference"
			}
			// Fast failures are not throughput: hide the ratio when more
			// than 1% of the requests failed.
			if s.requests > 0 && float64(s.errors) > 0.01*float64(s.requests) {
				ratio = "— (errors)"
			}
			errs := strconv.FormatInt(s.errors, 10)
			if s.errors > 0 && s.requests > 0 {
				errs += fmt.Sprintf(" (%.1f%%)", 100*float64(s.errors)/float64(s.requests))
			}
			fmt.Fprintf(&b, "| %s | %s | %.0f | %.0f–%.0f | %s | %s | %s | %s | %s |\n",
				w.id, srv, s.median, s.min, s.max, fmtMS(s.p50), fmtMS(s.p99), errs,
				mbKB(strconv.FormatInt(s.peakRSSKB, 10)), ratio)
		}
	}

	if err := feedLagTable(&b, *dir, sums); err != nil {
		return err
	}
	if err := fleetReport(&b, *dir, rows, sums); err != nil {
		return err
	}
	if err := backupTable(&b, *dir, meta); err != nil {
		return err
	}

	fmt.Fprintf(&b, "\n## Workloads and references\n\n")
	for _, w := range workloads {
		fmt.Fprintf(&b, "- **%s**: %s. Ratio against %s (%s).\n", w.id, w.desc, w.refServer, w.refWorkload)
	}
	fmt.Fprintf(&b, "- refsqlite (a) and refpgx (a) are compared with refhttp (a), to show what each database costs on its own; productsvc+postgres is compared with refpgx wherever productsvc is compared with refsqlite.\n")
	fmt.Fprintf(&b, "- refhttp: net/http answering one fixed ~300-byte product body (ceiling of HTTP). refsqlite: net/http + modernc SQLite, prepared point query on WAL read connections, one writer connection with synchronous=FULL and one row per transaction (ceiling of HTTP + SQLite).\n")
	fmt.Fprintf(&b, "- refpgx: net/http + a pgx pool (the pool size productsvc uses by default) on the same PostgreSQL server, one pooled SELECT per read and one INSERT (its own transaction) per create. PostgreSQL runs with its durable defaults (fsync, synchronous_commit on) from Debian's package, on the same 2 cores.\n")
	fmt.Fprintf(&b, "- productsvc+postgres: productsvc with DATABASE_URL on that server, its catalog moved there with -copy-to from the same seeded SQLite file.\n")
	if meta["haproxy"] != "" || hasAny(sums, fleetServers) {
		fmt.Fprintf(&b, "- fleet-1-direct, fleet-1, fleet-2: productsvc replicas with DATABASE_URL on a third database of the same PostgreSQL server (the catalog moved there with -copy-to, no write workload before) and REDIS_URL on one shared redis-server, default caches and access log; fleet-1-direct is one replica without a proxy, fleet-1 the same replica behind HAProxy, fleet-2 it and a second replica behind HAProxy (round robin); refhttp-fleet-1 and refhttp-fleet-2 are the same HAProxy in front of one and two refhttp servers. Peak RSS is the largest replica's. Their reads are compared with refhttp, their listings with refpgx, as productsvc+postgres's.\n")
	}
	fmt.Fprintf(&b, "- productsvc: SQLite only (REDIS_URL unset). productsvc+redis: with a local redis-server as cache. Both run the default configuration (access log at INFO, DB_SYNC=full, in-process cache of 10000 products) and start from a copy of the same seeded database.\n")

	notes, err := os.ReadFile(*dir + "/notes.txt")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	notesText := strings.TrimSpace(string(notes))
	if notesText != "" || len(parseProblems) > 0 {
		fmt.Fprintf(&b, "\n## Problems seen during the run\n\n")
		for _, l := range strings.Split(notesText, "\n") {
			if l != "" {
				fmt.Fprintf(&b, "- %s\n", l)
			}
		}
		for _, p := range parseProblems {
			fmt.Fprintf(&b, "- wrk output unreadable: %s\n", p)
		}
	}

	if *outPath != "" {
		if err := os.WriteFile(*outPath, []byte(b.String()), 0o644); err != nil {
			return err
		}
	}
	_, err = io.WriteString(stdout, b.String())
	return err
}

// lagAcc adds up one consumer's summaries of the repeats of workload i.
type lagAcc struct {
	events           int64
	p50, p99, maxLag []float64
	outOfOrder       int64
	duplicates       int64
}

// readLags reads a list of summary files (server, repeat, file; feedlag's
// or relaylag's lines) into one lagAcc per server. A missing list is none.
func readLags(path string) (map[string]*lagAcc, error) {
	rows, err := readTSV(path)
	if err != nil {
		return nil, err
	}
	accs := map[string]*lagAcc{}
	for _, r := range rows {
		if len(r) < 3 {
			continue
		}
		out, err := os.ReadFile(r[2])
		if err != nil {
			return nil, err
		}
		vals := map[string]float64{}
		for _, f := range strings.Fields(string(out)) {
			if k, v, ok := strings.Cut(f, "="); ok {
				vals[k], _ = strconv.ParseFloat(v, 64)
			}
		}
		a := accs[r[0]]
		if a == nil {
			a = &lagAcc{}
			accs[r[0]] = a
		}
		a.events += int64(vals["events"])
		a.p50 = append(a.p50, vals["p50_ms"])
		a.p99 = append(a.p99, vals["p99_ms"])
		a.maxLag = append(a.maxLag, vals["max_ms"])
		a.outOfOrder += int64(vals["out_of_order"])
		a.duplicates += int64(vals["duplicates"])
	}
	return accs, nil
}

// feedLagTable writes the delivery lag the consumers measured during
// workload i: feedlag.tsv (GET /events as SSE) and relaylag.tsv (the
// relay's RabbitMQ exchange) list server, repeat and the summary file of
// each run.
func feedLagTable(b *strings.Builder, dir string, sums map[key]summary) error {
	sse, err := readLags(dir + "/feedlag.tsv")
	if err != nil {
		return err
	}
	relay, err := readLags(dir + "/relaylag.tsv")
	if err != nil {
		return err
	}
	if len(sse) == 0 && len(relay) == 0 {
		return nil
	}
	fmt.Fprintf(b, "\n## Change-feed delivery lag\n\n")
	fmt.Fprintf(b, "During workload i one consumer follows GET /events as Server-Sent Events from the end of the feed; lag is the time it read an event minus the event's occurred_at (same host, same clock; occurred_at is taken in the write's transaction, so the lag includes the commit). p50/p99 are medians of the repeats; max is the largest of any repeat; out of order counts events whose seq did not exceed the one before. Each write appends one event, so a consumer that keeps up receives about as many events as there were writes; fewer means it fell behind and the lag grows with the run.\n\n")
	if len(relay) > 0 {
		fmt.Fprintf(b, "The relay rows: the same writes, the service running with AMQP_URL (a throwaway local RabbitMQ), consumed by `harness relaylag` through a queue of its own bound to the exchange with `#`; lag is the time of a message's first delivery minus the CloudEvent's time (the event's occurred_at): commit, the relay's wake-up or poll, publish, the broker's confirm, the routing and the delivery. Duplicates are deliveries of a message id already received.\n\n")
	}
	fmt.Fprintf(b, "| server | consumer | write load req/s | writes | events received | lag p50 | lag p99 | lag max | out of order | duplicates |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, srv := range serverOrder {
		load, writes := "—", "—"
		if s, ok := sums[key{"i", srv}]; ok {
			load, writes = fmt.Sprintf("%.0f", s.median), strconv.FormatInt(s.requests, 10)
		}
		if a, ok := sse[srv]; ok {
			fmt.Fprintf(b, "| %s | GET /events (SSE) | %s | %s | %d | %s | %s | %s | %d | — |\n", srv, load, writes, a.events, fmtMS(median(a.p50)), fmtMS(median(a.p99)), fmtMS(slices.Max(a.maxLag)), a.outOfOrder)
		}
		if a, ok := relay[srv]; ok {
			fmt.Fprintf(b, "| %s | relay → RabbitMQ | %s | %s | %d | %s | %s | %s | %d | %d |\n", srv, load, writes, a.events, fmtMS(median(a.p50)), fmtMS(median(a.p99)), fmtMS(slices.Max(a.maxLag)), a.outOfOrder, a.duplicates)
		}
	}
	return nil
}

// hasAny reports whether sums holds a figure of any of servers.
func hasAny(sums map[key]summary, servers []string) bool {
	for k := range sums {
		if slices.Contains(servers, k.server) {
			return true
		}
	}
	return false
}

func fmtMS(ms float64) string {
	if ms < 10 {
		return fmt.Sprintf("%.2f ms", ms)
	}
	return fmt.Sprintf("%.1f ms", ms)
}

func orDash(s, unit string) string {
	if s == "" {
		return "—"
	}
	return s + unit
}

// mb formats a byte count in MiB.
func mb(bytesStr string) string {
	n, err := strconv.ParseFloat(bytesStr, 64)
	if err != nil || n <= 0 {
		return "—"
	}
	return fmt.Sprintf("%.1f MiB", n/(1<<20))
}

// mbKB formats a /proc/PID/status count (kB, which is KiB) in MiB.
func mbKB(kbStr string) string {
	n, err := strconv.ParseFloat(kbStr, 64)
	if err != nil || n <= 0 {
		return "—"
	}
	return fmt.Sprintf("%.1f MiB", n/1024)
}
