package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// dbLedger is what TestDatabaseFaults knows about the rows it wrote.
type dbLedger struct {
	want    map[string]product // sku -> last acknowledged state
	failed  map[string]bool    // creates answered with a definite error
	unknown map[string]bool    // creates whose outcome is unknown (transport error or 5xx other than 503)
	seq     int
}

// create sends one create with a large description (so that the disk fills
// fast) and records the outcome. It returns the response, or nil with err.
func (l *dbLedger) create(c *client) (*response, error) {
	l.seq++
	sku := fmt.Sprintf("df-%05d", l.seq)
	body := createBody(sku, "disk fault item", int64(l.seq), map[string]any{
		"description": strings.Repeat("d", 3900), "category": "diskfault",
	})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	r, err := c.do(ctx, http.MethodPost, "/products", body, nil)
	switch {
	case err != nil:
		l.unknown[sku] = true
	case r.Status == http.StatusCreated:
		var p product
		if jerr := json.Unmarshal(r.Body, &p); jerr != nil {
			l.unknown[sku] = true
		} else {
			l.want[sku] = p
		}
	case r.Status >= 400 && r.Status < 500, r.Status == http.StatusServiceUnavailable:
		l.failed[sku] = true
	default:
		l.unknown[sku] = true
	}
	return r, err
}

// mountTmpfs mounts a tmpfs of size at dir.
func mountTmpfs(dir, size string) error {
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mount -t tmpfs -o size=%s tmpfs %s: %v: %s", size, dir, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func remount(dir, mode string) error {
	out, err := exec.Command("mount", "-o", "remount,"+mode, dir).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mount -o remount,%s %s: %v: %s", mode, dir, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// freeBytes returns the free space of dir's filesystem (we run as root,
// so reserved blocks count).
func freeBytes(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bfree) * st.Bsize, nil
}

// fillDisk writes filler until the filesystem is full, then gives back
// leave bytes. It returns the filler's final size.
func fillDisk(t *testing.T, path string, leave int64) int64 {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatalf("create filler: %v", err)
	}
	defer f.Close()
	chunk := make([]byte, 64<<10)
	var size int64
	for i := 0; i < 100000; i++ {
		n, err := f.Write(chunk)
		size += int64(n)
		if err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("fill %s: %v", path, err)
			}
			break
		}
	}
	if err := f.Truncate(max(0, size-leave)); err != nil {
		t.Fatalf("truncate filler: %v", err)
	}
	return max(0, size-leave)
}

// expectWrite503 checks r for a 503 problem and reports other outcomes.
func expectWrite503(t *testing.T, what string, r *response, err error) {
	t.Helper()
	switch {
	case err != nil:
		t.Errorf("%s: transport error %v, want 503 problem", what, err)
	case r.Status == http.StatusInternalServerError:
		t.Errorf("%s: got 500, want 503 (never 500 for a full or read-only disk): %s", what, r)
	default:
		if d := checkProblem(r, http.StatusServiceUnavailable); d != "" {
			t.Errorf("%s: %s (%s)", what, d, r)
		}
	}
}

// checkReads asserts that reads keep working: every acknowledged product by
// id, and the list.
func checkReads(t *testing.T, c *client, led *dbLedger, when string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bad := 0
	for sku, w := range led.want {
		p, r, err := getProduct(ctx, c, w.ID)
		switch {
		case err != nil:
			bad++
			t.Errorf("%s: GET /products/%d: %v", when, w.ID, err)
		case r.Status != http.StatusOK:
			bad++
			t.Errorf("%s: GET /products/%d: %s, want 200", when, w.ID, r)
		default:
			if d := diffProduct(w, p); d != "" {
				t.Errorf("%s: GET /products/%d (sku %s): %s", when, w.ID, sku, d)
			}
		}
		if bad > 5 {
			break
		}
	}
	for _, path := range []string{"/products?limit=20", "/products?limit=5&sort=-price_cents", "/products?category=diskfault"} {
		r, err := c.do(ctx, http.MethodGet, path, nil, nil)
		if err != nil || r.Status != http.StatusOK || !json.Valid(r.Body) {
			t.Errorf("%s: GET %s: %v %v, want 200 JSON", when, path, r, err)
		}
	}
}

// waitWriteBreaker polls /ready (driving a write before each poll, so that
// a breaker has traffic to trip or probe on) until checks.breaker.write is
// want. When write is "open" the service must still be ready (200,
// "degraded"). It returns how long it took.
func waitWriteBreaker(t *testing.T, c *client, led *dbLedger, want string, timeout time.Duration, drive bool) (time.Duration, bool) {
	t.Helper()
	start := time.Now()
	var last string
	ok := pollUntil(timeout, 200*time.Millisecond, func() bool {
		if drive {
			r, err := led.create(c)
			if want == "open" {
				expectWrite503(t, "POST /products while the disk is failing", r, err)
			}
		}
		rb, r, err := getReady(c)
		if err != nil {
			last = err.Error()
			return false
		}
		last = r.String()
		if rb.Checks.Breaker.Write != want {
			return false
		}
		if want == "open" && (r.Status != http.StatusOK || rb.Status != "degraded") {
			t.Errorf("GET /ready with the write breaker open: %s, want 200 with status \"degraded\" (reads still work)", r)
		}
		return true
	})
	if !ok {
		t.Errorf("GET /ready: checks.breaker.write did not become %q within %v; last: %s", want, timeout, last)
	}
	return time.Since(start), ok
}

// recoverWrites polls with creates until one succeeds, then waits for the
// write breaker to close; both within timeout.
func recoverWrites(t *testing.T, c *client, led *dbLedger, timeout time.Duration) {
	t.Helper()
	start := time.Now()
	var last string
	if !pollUntil(timeout, 250*time.Millisecond, func() bool {
		r, err := led.create(c)
		if err != nil {
			last = err.Error()
			return false
		}
		last = r.String()
		if r.Status == http.StatusInternalServerError {
			t.Errorf("POST /products during recovery: 500: %s", r)
		}
		return r.Status == http.StatusCreated
	}) {
		t.Errorf("writes did not succeed again within %v of the fault clearing; last: %s", timeout, last)
		return
	}
	firstOK := time.Since(start)
	d, ok := waitWriteBreaker(t, c, led, "closed", timeout-firstOK, true)
	if ok {
		t.Logf("recovery: first successful write after %v, write breaker closed after %v", firstOK.Round(time.Millisecond), (firstOK + d).Round(time.Millisecond))
	}
}

// verifyRows asserts that the list holds exactly the acknowledged creates
// with their acknowledged values: nothing half-written, nothing lost.
func verifyRows(t *testing.T, c *client, led *dbLedger, when string) {
	t.Helper()
	all := mustListAll(t, c)
	present := map[string]product{}
	for _, p := range all {
		present[p.SKU] = p
	}
	for sku, w := range led.want {
		p, ok := present[sku]
		if !ok {
			t.Errorf("%s: acknowledged sku %s (id %d) missing", when, sku, w.ID)
			continue
		}
		if d := diffProduct(w, p); d != "" {
			t.Errorf("%s: sku %s: %s", when, sku, d)
		}
	}
	extra := 0
	for sku := range present {
		if _, ok := led.want[sku]; ok {
			continue
		}
		if led.unknown[sku] {
			extra++
			continue
		}
		if led.failed[sku] {
			t.Errorf("%s: sku %s got a definite error response but was written", when, sku)
		} else {
			t.Errorf("%s: unexpected row sku %s", when, sku)
		}
	}
	if n := len(all) - extra; n != len(led.want) {
		t.Errorf("%s: %d rows listed (%d with unknown outcome), want %d acknowledged creates", when, len(all), extra, len(led.want))
	}
	t.Logf("%s: rows listed=%d acknowledged creates=%d failed creates=%d unknown=%d", when, len(all), len(led.want), len(led.failed), len(led.unknown))
}

func TestDatabaseFaults(t *testing.T) {
	if onPostgres() {
		t.Skip("SKIP: disk faults are SQLite's; PostgreSQL's own server is restarted in the fleet suite")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIP: disk-full and read-only faults need root to mount a tmpfs")
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mountTmpfs(mnt, "4m"); err != nil {
		t.Skipf("SKIP: cannot mount a tmpfs for the database (%v); the disk-full and read-only faults are not exercised", err)
	}
	// Registered before the service starts, so it runs after the service
	// has been killed (cleanups run last-in first-out).
	t.Cleanup(func() {
		_ = remount(mnt, "rw")
		var err error
		for i := 0; i < 20; i++ {
			if err = exec.Command("umount", mnt).Run(); err == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("umount %s: %v; detaching lazily", mnt, err)
		_ = exec.Command("umount", "-l", mnt).Run()
	})

	dbPath := filepath.Join(mnt, "products.db")
	svc, c := startReadyService(t, map[string]string{"DB_PATH": dbPath})
	led := &dbLedger{want: map[string]product{}, failed: map[string]bool{}, unknown: map[string]bool{}}
	for i := 0; i < 20; i++ {
		if r, err := led.create(c); err != nil || r.Status != http.StatusCreated {
			t.Fatalf("seed create: %v %v", r, err)
		}
	}

	t.Run("disk-full", func(t *testing.T) {
		filler := filepath.Join(mnt, "filler")
		size := fillDisk(t, filler, 96<<10)
		free, _ := freeBytes(mnt)
		t.Logf("filler %d bytes; %d bytes free on the 4 MiB tmpfs", size, free)

		okBefore, fails := 0, 0
		for i := 0; i < 3000 && fails == 0; i++ {
			r, err := led.create(c)
			switch {
			case err != nil:
				t.Fatalf("POST /products while filling the disk: %v", err)
			case r.Status == http.StatusCreated:
				okBefore++
			default:
				fails++
				expectWrite503(t, "first failing POST /products on a full disk", r, err)
			}
		}
		if fails == 0 {
			t.Fatalf("3000 creates succeeded on a full 4 MiB tmpfs; the disk never filled")
		}
		t.Logf("disk full after %d more acknowledged creates", okBefore)

		// Other writes fail the same way, and change nothing.
		var some product
		for _, p := range led.want {
			some = p
			break
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		r, err := c.do(ctx, http.MethodPatch, "/products/"+strconv.FormatInt(some.ID, 10),
			[]byte(fmt.Sprintf(`{"description":%q}`, strings.Repeat("p", 3000))), http.Header{"Content-Type": {"application/merge-patch+json"}})
		cancel()
		if err == nil && r.Status == http.StatusOK {
			var p product
			if json.Unmarshal(r.Body, &p) == nil {
				led.want[p.SKU] = p
			}
			t.Logf("PATCH on the full disk succeeded (it may fit in freed pages)")
		} else {
			expectWrite503(t, "PATCH on a full disk", r, err)
		}

		checkReads(t, c, led, "disk full")
		d, _ := waitWriteBreaker(t, c, led, "open", 15*time.Second, true)
		t.Logf("write breaker open %v after the first failure", d.Round(time.Millisecond))
		checkReads(t, c, led, "disk full, breaker open")

		if err := os.Remove(filler); err != nil {
			t.Fatalf("remove filler: %v", err)
		}
		recoverWrites(t, c, led, 30*time.Second)
		verifyRows(t, c, led, "after disk-full recovery")
	})

	t.Run("read-only", func(t *testing.T) {
		var err error
		var restore func() error
		how := "mount -o remount,ro"
		// The kernel refuses while files are open for writing; give the
		// service a few chances in case it closes idle handles.
		if pollUntil(3*time.Second, 250*time.Millisecond, func() bool {
			err = remount(mnt, "ro")
			return err == nil
		}) {
			restore = func() error { return remount(mnt, "rw") }
		} else {
			// Linux refuses to remount a filesystem read-only while a process
			// holds files on it open for writing, and SQLite keeps the database
			// and its -wal open read-write. Fall back to making every write
			// system call of the running service fail with EROFS, which is
			// what it would see on a filesystem that turned read-only
			// underneath it.
			t.Logf("%v; falling back to strace fault injection", err)
			restore, err = injectEROFS(t, svc.PID())
			if err != nil {
				t.Skipf("SKIP read-only: remount refused (busy: SQLite holds the files open for writing) and strace fault injection unavailable: %v", err)
			}
			how = "strace -e inject=pwrite64,fsync,...:error=EROFS"
		}
		restored := false
		defer func() {
			if !restored {
				_ = restore()
			}
		}()
		t.Logf("read-only fault injected with %s", how)
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		r, err := c.do(ctx, http.MethodPost, "/products", createBody("ro-direct", "read only", 1, nil), nil)
		cancel()
		if err == nil && r.Status == http.StatusCreated {
			led.unknown["ro-direct"] = true
			t.Errorf("POST /products on a read-only filesystem: 201, want 503")
		} else {
			led.failed["ro-direct"] = true
			expectWrite503(t, "POST /products on a read-only filesystem", r, err)
		}
		d, _ := waitWriteBreaker(t, c, led, "open", 15*time.Second, true)
		t.Logf("read-only: write breaker open after %v", d.Round(time.Millisecond))
		checkReads(t, c, led, "read-only")
		if err := restore(); err != nil {
			t.Fatalf("undo read-only (%s): %v", how, err)
		}
		restored = true
		recoverWrites(t, c, led, 30*time.Second)
		verifyRows(t, c, led, "after read-only recovery")
	})

	code := svc.Stop(40 * time.Second)
	t.Logf("RESULT acknowledged creates=%d failed creates=%d unknown=%d; exit status after SIGTERM %d", len(led.want), len(led.failed), len(led.unknown), code)
	if code != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0", code)
	}
}

// injectEROFS attaches strace to pid and makes every file write, sync and
// truncate of the process fail with EROFS until the returned func detaches
// it. Socket and stdout writes use write(2) and are left alone.
func injectEROFS(t *testing.T, pid int) (func() error, error) {
	t.Helper()
	if _, err := exec.LookPath("strace"); err != nil {
		return nil, err
	}
	const set = "pwrite64,pwritev,pwritev2,fsync,fdatasync,ftruncate,fallocate"
	cmd := exec.Command("strace", "-f", "-qq", "-o", "/dev/null", "-p", strconv.Itoa(pid),
		"-e", "trace="+set, "-e", "inject="+set+":error=EROFS")
	out := newLineLog(100, nil)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	detach := func() error {
		select {
		case <-done:
			return nil
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
			return nil
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			return fmt.Errorf("strace did not detach within 10s")
		}
	}
	t.Cleanup(func() { _ = detach() })
	// Attached once every thread of the service names strace as its tracer.
	tracer := strconv.Itoa(cmd.Process.Pid)
	attached := pollUntil(10*time.Second, 50*time.Millisecond, func() bool {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil || len(tasks) == 0 {
			return false
		}
		for _, task := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
			if err != nil {
				return false
			}
			traced := false
			for _, line := range strings.Split(string(b), "\n") {
				if v, ok := strings.CutPrefix(line, "TracerPid:"); ok && strings.TrimSpace(v) == tracer {
					traced = true
				}
			}
			if !traced {
				return false
			}
		}
		return true
	})
	if !attached {
		_ = detach()
		return nil, fmt.Errorf("strace did not attach to every thread of pid %d within 10s: %s", pid, out.Tail(10))
	}
	return detach, nil
}
