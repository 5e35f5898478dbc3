package main

// The fleet part of the report: productsvc replicas on one PostgreSQL
// database and one Redis, measured directly and behind HAProxy. run.sh
// scrapes each replica's /metrics and samples the CPU time of the
// processes involved before and after every measured run; this file turns
// those samples into what the read fence costs per request and where the
// CPU went.

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// clkTck is USER_HZ, the unit of the CPU times in /proc: 100 on every
// Linux architecture Go supports.
const clkTck = 100

// cmdCPU prints, for each NAME=PID argument, the CPU time (user and
// system, in seconds) used by the process and its descendants, counting
// descendants that exited and were waited for; then the busy time of all
// CPUs ("machine") and the wall clock ("wall"), so that two samples give
// cores used over the interval.
func cmdCPU(args []string, stdout io.Writer) error {
	procs := procTable()
	var b strings.Builder
	for _, a := range args {
		name, pidStr, ok := strings.Cut(a, "=")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil {
			return fmt.Errorf("cpu: %q is not NAME=PID", a)
		}
		fmt.Fprintf(&b, "%s %.2f\n", name, float64(treeTicks(procs, pid))/clkTck)
	}
	busy, err := machineBusyTicks()
	if err != nil {
		return err
	}
	fmt.Fprintf(&b, "machine %.2f\nwall %.3f\n", float64(busy)/clkTck, float64(time.Now().UnixNano())/1e9)
	_, err = io.WriteString(stdout, b.String())
	return err
}

type procStat struct {
	ppid  int
	ticks int64 // utime + stime + cutime + cstime
}

// procTable reads /proc/PID/stat of every process. Processes that exit
// while it reads are left out.
func procTable() map[int]procStat {
	out := map[int]procStat{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// The command name may hold spaces and parentheses: the fields
		// start after the last ')'. Then state, ppid, ... utime is field
		// 14 of the whole line, so index 11 here.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 15 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		var ticks int64
		for _, s := range f[11:15] {
			n, _ := strconv.ParseInt(s, 10, 64)
			ticks += n
		}
		out[pid] = procStat{ppid: ppid, ticks: ticks}
	}
	return out
}

// treeTicks sums the ticks of pid and of every process below it.
func treeTicks(procs map[int]procStat, pid int) int64 {
	children := map[int][]int{}
	for p, s := range procs {
		children[s.ppid] = append(children[s.ppid], p)
	}
	var total int64
	todo := []int{pid}
	for len(todo) > 0 {
		p := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if s, ok := procs[p]; ok {
			total += s.ticks
		}
		todo = append(todo, children[p]...)
	}
	return total
}

// machineBusyTicks returns the time all CPUs spent neither idle nor waiting
// for I/O, from the first line of /proc/stat.
func machineBusyTicks() (int64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 9 || f[0] != "cpu" {
		return 0, errors.New("/proc/stat: no cpu line")
	}
	var busy int64
	for i, s := range f[1:9] { // user nice system idle iowait irq softirq steal
		if i == 3 || i == 4 {
			continue
		}
		n, _ := strconv.ParseInt(s, 10, 64)
		busy += n
	}
	return busy, nil
}

// promSample holds one /metrics scrape: the value of every series, keyed
// by the series as the text format writes it (name{labels}).
type promSample map[string]float64

func readProm(path string) (promSample, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := promSample{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("%s: no metrics", path)
	}
	return m, sc.Err()
}

// sum adds the series of metric name whose labels contain every one of
// labels (each written as in the text format: route="GET /products").
func (m promSample) sum(name string, labels ...string) float64 {
	var t float64
	for k, v := range m {
		series, rest, _ := strings.Cut(k, "{")
		if series != name {
			continue
		}
		if !containsAll(rest, labels) {
			continue
		}
		t += v
	}
	return t
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// fenceBuckets are read_fence_wait_seconds's upper bounds, as the text
// format writes them.
var fenceBuckets = []string{"0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf"}

// fenceAcc sums what the replicas' counters moved by during the measured
// runs of one workload on one server.
type fenceAcc struct {
	requests      int64   // wrk's, over the runs with a scrape
	latencyMSReqs float64 // Σ wrk mean latency × requests
	rounds        float64
	waits, waitS  float64
	buckets       []float64 // cumulative, as fenceBuckets
	applied       float64
	localHit      float64
	localMiss     float64
	perReplica    map[string]float64 // product requests answered
	replicas      []string
}

// bucketBound returns the smallest bucket bound holding the q-quantile
// of the waits, as "≤ 0.25 ms".
func (a *fenceAcc) bucketBound(q float64) string {
	if a.waits == 0 {
		return "—"
	}
	for i, c := range a.buckets {
		if c >= q*a.waits {
			if fenceBuckets[i] == "+Inf" {
				return "> 2.5 s"
			}
			s, _ := strconv.ParseFloat(fenceBuckets[i], 64)
			return "≤ " + fmtDur(s)
		}
	}
	return "—"
}

// fmtDur formats seconds as µs or ms.
func fmtDur(s float64) string {
	switch {
	case s < 1e-3:
		return fmt.Sprintf("%.0f µs", s*1e6)
	case s < 10e-3:
		return fmt.Sprintf("%.2f ms", s*1e3)
	default:
		return fmt.Sprintf("%.1f ms", s*1e3)
	}
}

// fleetServers are the fleet configurations, in report order: productsvc
// replicas, then the same HAProxy in front of one and two refhttp servers.
var fleetServers = []string{"fleet-1-direct", "fleet-1", "fleet-2", "refhttp-fleet-1", "refhttp-fleet-2"}

// runKey names one measured run.
type runKey struct{ workload, server, rep string }

// fleetReport writes the fleet's targets, the read fence's cost and the
// CPU table. results are results.tsv's rows; fence.tsv lists workload,
// server, repeat, replica and the scrapes before and after the run;
// cpu.tsv lists workload, server, repeat and the two CPU samples.
func fleetReport(b *strings.Builder, dir string, results [][]string, sums map[key]summary) error {
	fenceRows, err := readTSV(dir + "/fence.tsv")
	if err != nil {
		return err
	}
	cpuRows, err := readTSV(dir + "/cpu.tsv")
	if err != nil {
		return err
	}
	hasFleet := false
	for _, srv := range fleetServers {
		for _, w := range workloads {
			if _, ok := sums[key{w.id, srv}]; ok {
				hasFleet = true
			}
		}
	}
	if !hasFleet && len(fenceRows) == 0 {
		return nil
	}

	runs := map[runKey]wrkRun{}
	for _, r := range results {
		if len(r) < 4 {
			continue
		}
		out, err := os.ReadFile(r[3])
		if err != nil {
			return err
		}
		if w, err := parseWrk(out); err == nil {
			runs[runKey{r[0], r[1], r[2]}] = w
		}
	}

	fmt.Fprintf(b, "\n## Fleet: replicas on one PostgreSQL database behind HAProxy\n\n")
	fmt.Fprintf(b, "Every replica follows the database's change log and, before it answers a product read or listing from its in-process cache or Redis, waits for a read-fence round: one change-log head query shared by all the reads waiting when it starts (strict reads across replicas). fleet-1-direct is one replica (PostgreSQL, a shared Redis, default caches) measured without a proxy; fleet-1 is that replica behind HAProxy; fleet-2 is two replicas on the same database and Redis behind the same HAProxy configuration with both servers. refhttp-fleet-1 and refhttp-fleet-2 put the same HAProxy in front of one and two refhttp servers: the step from one server to two on this machine without anything of productsvc's. Everything shares the machine's cores with wrk, PostgreSQL and Redis, so a second replica adds no CPU, only processes.\n\n")

	fleetTargets(b, sums)
	if err := fenceTable(b, fenceRows, runs, sums); err != nil {
		return err
	}
	return cpuTable(b, cpuRows)
}

// ratioOf returns num's median over den's, or false when either is
// missing or more than 1% of its requests failed.
func ratioOf(sums map[key]summary, num, den key) (float64, summary, summary, bool) {
	n, ok1 := sums[num]
	d, ok2 := sums[den]
	if !ok1 || !ok2 || d.median == 0 || failing(n) || failing(d) {
		return 0, n, d, false
	}
	return n.median / d.median, n, d, true
}

// ranWorkload reports whether any server ran workload w.
func ranWorkload(sums map[key]summary, w string) bool {
	for k := range sums {
		if k.workload == w {
			return true
		}
	}
	return false
}

func failing(s summary) bool {
	return s.requests > 0 && float64(s.errors) > 0.01*float64(s.requests)
}

func fleetTargets(b *strings.Builder, sums map[key]summary) {
	type target struct {
		what     string
		num, den key
		min      float64 // 0: no target, shown for comparison
	}
	var rows []target
	rows = append(rows,
		target{"`GET /products/{id}` with strict cross-replica reads ≥ 0.5× the net/http reference (one replica, direct)", key{"a", "fleet-1-direct"}, key{"a", "refhttp"}, 0.5},
		target{"two replicas ≥ 0.9× one replica, both behind HAProxy: `GET /products/{id}`", key{"a", "fleet-2"}, key{"a", "fleet-1"}, 0.9},
		target{"two replicas ≥ 0.9× one replica, both behind HAProxy: `GET /products?limit=20`", key{"b", "fleet-2"}, key{"b", "fleet-1"}, 0.9},
		target{"the same step without productsvc: two refhttp vs one, both behind HAProxy", key{"a", "refhttp-fleet-2"}, key{"a", "refhttp-fleet-1"}, 0},
		target{"HAProxy's cost: one replica behind HAProxy vs direct, `GET /products/{id}`", key{"a", "fleet-1"}, key{"a", "fleet-1-direct"}, 0},
		target{"HAProxy's cost: one replica behind HAProxy vs direct, `GET /products?limit=20`", key{"b", "fleet-1"}, key{"b", "fleet-1-direct"}, 0},
		target{"HAProxy's cost without productsvc: one refhttp behind HAProxy vs refhttp direct", key{"a", "refhttp-fleet-1"}, key{"a", "refhttp"}, 0},
		target{"two replicas behind HAProxy vs the net/http reference, `GET /products/{id}`", key{"a", "fleet-2"}, key{"a", "refhttp"}, 0},
		target{"one replica, direct, vs productsvc+postgres (the same fence, without Redis), `GET /products/{id}`", key{"a", "fleet-1-direct"}, key{"a", "productsvc+postgres"}, 0},
		target{"one replica, direct, vs productsvc+redis (SQLite with Redis: no fence), `GET /products/{id}`", key{"a", "fleet-1-direct"}, key{"a", "productsvc+redis"}, 0},
	)
	fmt.Fprintf(b, "| target or comparison | measured (medians) | |\n|---|---|---|\n")
	for _, t := range rows {
		r, n, d, ok := ratioOf(sums, t.num, t.den)
		_, nok := sums[t.num]
		_, dok := sums[t.den]
		if t.min == 0 && (!nok || !dok) {
			continue // a comparison needs both
		}
		if !ranWorkload(sums, t.num.workload) {
			continue
		}
		measured, verdict := "—", ""
		switch {
		case ok:
			measured = fmt.Sprintf("%s %.0f req/s / %s %.0f req/s = %.2f×", t.num.server, n.median, t.den.server, d.median, r)
		case !nok || !dok:
			measured = fmt.Sprintf("not measured (%s or %s missing)", t.num.server, t.den.server)
		default:
			measured = "more than 1% errors"
		}
		switch {
		case t.min == 0:
			verdict = "comparison"
		case !ok:
			verdict = "not measured"
		case r >= t.min:
			verdict = "met"
		default:
			verdict = "not met"
		}
		fmt.Fprintf(b, "| %s | %s | %s |\n", t.what, measured, verdict)
	}
}

func fenceTable(b *strings.Builder, rows [][]string, runs map[runKey]wrkRun, sums map[key]summary) error {
	accs := map[key]*fenceAcc{}
	counted := map[runKey]bool{}
	for _, r := range rows {
		if len(r) < 6 {
			continue
		}
		rk := runKey{r[0], r[1], r[2]}
		w, ok := runs[rk]
		if !ok {
			continue // the wrk run failed or is unreadable
		}
		before, err1 := readProm(r[4])
		after, err2 := readProm(r[5])
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		k := key{r[0], r[1]}
		a := accs[k]
		if a == nil {
			a = &fenceAcc{buckets: make([]float64, len(fenceBuckets)), perReplica: map[string]float64{}}
			accs[k] = a
		}
		if !counted[rk] {
			counted[rk] = true
			a.requests += w.requests
			a.latencyMSReqs += w.avg * float64(w.requests)
		}
		d := func(name string, labels ...string) float64 {
			return after.sum(name, labels...) - before.sum(name, labels...)
		}
		a.rounds += d("read_fence_rounds_total")
		a.waits += d("read_fence_wait_seconds_count")
		a.waitS += d("read_fence_wait_seconds_sum")
		for i, le := range fenceBuckets {
			a.buckets[i] += d("read_fence_wait_seconds_bucket", `le="`+le+`"`)
		}
		a.applied += d("changelog_events_applied_total")
		a.localHit += d("local_cache_requests_total", `result="hit"`)
		a.localMiss += d("local_cache_requests_total", `result="miss"`)
		if !slices.Contains(a.replicas, r[3]) {
			a.replicas = append(a.replicas, r[3])
		}
		a.perReplica[r[3]] += d("http_requests_total", `route="GET /products`)
	}
	if len(accs) == 0 {
		return nil
	}
	fmt.Fprintf(b, "\n### What the read fence costs\n\n")
	fmt.Fprintf(b, "From each replica's /metrics scraped before and after every measured run, summed over the repeats (and the replicas): rounds are `read_fence_rounds_total` (one head query each; the once-a-second look is among them), fenced reads and their wait are `read_fence_wait_seconds`'s count and sum, the quantiles are the histogram's bucket bounds. Requests are wrk's; the share is the mean fence wait over wrk's mean latency. A read the in-process cache misses goes on to Redis or the database after its fence.\n\n")
	fmt.Fprintf(b, "| workload | server | requests | fence rounds | rounds / request | fenced reads / request | mean fence wait | wait p50 | wait p99 | share of mean latency | events applied | in-process hits | requests per replica |\n")
	fmt.Fprintf(b, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	order := append([]string{"productsvc+postgres"}, fleetServers...)
	for _, w := range workloads {
		for _, srv := range order {
			a, ok := accs[key{w.id, srv}]
			if !ok || a.waits == 0 || a.requests == 0 {
				continue
			}
			mean := a.waitS / a.waits
			share := "—"
			if a.latencyMSReqs > 0 {
				share = fmt.Sprintf("%.0f%%", 100*mean*1e3/(a.latencyMSReqs/float64(a.requests)))
			}
			hits := "—"
			if a.localHit+a.localMiss > 0 {
				hits = fmt.Sprintf("%.1f%%", 100*a.localHit/(a.localHit+a.localMiss))
			}
			split := "—"
			var total float64
			for _, v := range a.perReplica {
				total += v
			}
			if len(a.replicas) > 1 && total > 0 {
				var parts []string
				for _, r := range a.replicas {
					parts = append(parts, fmt.Sprintf("%s %.0f%%", r, 100*a.perReplica[r]/total))
				}
				split = strings.Join(parts, " · ")
			}
			fmt.Fprintf(b, "| %s | %s | %d | %.0f | %.3f | %.2f | %s | %s | %s | %s | %.0f | %s | %s |\n",
				w.id, srv, a.requests, a.rounds, a.rounds/float64(a.requests), a.waits/float64(a.requests),
				fmtDur(mean), a.bucketBound(0.5), a.bucketBound(0.99), share, a.applied, hits, split)
		}
	}
	return nil
}

// cpuTable writes the cores each process used during the measured runs
// (CPU seconds over wall seconds between the samples, median of the
// repeats); "others" is the machine's busy time less the named processes
// (wrk among them): whatever else ran.
func cpuTable(b *strings.Builder, rows [][]string) error {
	type acc map[string][]float64
	accs := map[key]acc{}
	var keys []key
	names := []string{}
	for _, r := range rows {
		if len(r) < 5 {
			continue
		}
		before, err1 := readCPU(r[3])
		after, err2 := readCPU(r[4])
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		wall := after["wall"] - before["wall"]
		if wall <= 0 {
			continue
		}
		k := key{r[0], r[1]}
		a := accs[k]
		if a == nil {
			a = acc{}
			accs[k] = a
			keys = append(keys, k)
		}
		var named float64
		for n := range after {
			if n == "wall" {
				continue
			}
			c := (after[n] - before[n]) / wall
			a[n] = append(a[n], c)
			if n != "machine" {
				named += c
				if !slices.Contains(names, n) {
					names = append(names, n)
				}
			}
		}
		a["others"] = append(a["others"], max(0, (after["machine"]-before["machine"])/wall-named))
	}
	if len(accs) == 0 {
		return nil
	}
	rank := map[string]int{"productsvc": 0, "r1": 1, "r2": 2, "haproxy": 3, "postgres": 4, "redis": 5, "wrk": 6}
	slices.SortStableFunc(names, func(x, y string) int {
		rx, okx := rank[x]
		ry, oky := rank[y]
		if !okx {
			rx = math.MaxInt
		}
		if !oky {
			ry = math.MaxInt
		}
		return cmp.Compare(rx, ry)
	})
	fmt.Fprintf(b, "\n### Where the CPU goes\n\n")
	fmt.Fprintf(b, "Cores used during the measured runs (CPU seconds of the process and its children over the run's wall time, median of the repeats; postgres is the server with all its backends; r1 and r2 are the servers behind HAProxy, refhttp in the refhttp-fleet rows). machine is the busy time of all cores; others is machine less the named processes: whatever else ran on the machine meanwhile (near 0 when it was quiet).\n\n")
	fmt.Fprintf(b, "| workload | server | machine | %s | others |\n|---|---|---:|", strings.Join(names, " | "))
	for range names {
		fmt.Fprintf(b, "---:|")
	}
	fmt.Fprintf(b, "---:|\n")
	wlRank, srvRank := map[string]int{}, map[string]int{}
	for i, w := range workloads {
		wlRank[w.id] = i
	}
	for i, s := range append([]string{"productsvc+postgres"}, fleetServers...) {
		srvRank[s] = i
	}
	slices.SortStableFunc(keys, func(x, y key) int {
		if d := wlRank[x.workload] - wlRank[y.workload]; d != 0 {
			return d
		}
		return srvRank[x.server] - srvRank[y.server]
	})
	for _, k := range keys {
		a := accs[k]
		fmt.Fprintf(b, "| %s | %s | %.2f |", k.workload, k.server, median(a["machine"]))
		for _, n := range names {
			if v, ok := a[n]; ok {
				fmt.Fprintf(b, " %.2f |", median(v))
			} else {
				fmt.Fprintf(b, " — |")
			}
		}
		fmt.Fprintf(b, " %.2f |\n", median(a["others"]))
	}
	var busy []string
	for _, k := range keys {
		if o := median(accs[k]["others"]); o > noisyCores {
			busy = append(busy, fmt.Sprintf("%s on %s (%.2f)", k.workload, k.server, o))
		}
	}
	if len(busy) > 0 {
		fmt.Fprintf(b, "\nOther work took more than %.2f cores during %s: those figures, and the ratios taken with them, are disturbed.\n", noisyCores, strings.Join(busy, ", "))
	}
	return nil
}

// noisyCores is the CPU other processes may take during a run before the
// report calls its figures disturbed.
const noisyCores = 0.25

// readCPU reads one sample of harness cpu: "NAME SECONDS" lines.
func readCPU(path string) (map[string]float64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := map[string]float64{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		name, v, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		m[name], _ = strconv.ParseFloat(v, 64)
	}
	if _, ok := m["wall"]; !ok {
		return nil, fmt.Errorf("%s: not a cpu sample", path)
	}
	return m, nil
}
