package e2e

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// backupManifest is the part of a backup's manifest the suite reads.
type backupManifest struct {
	Name    string `json:"name"`
	SHA256  string `json:"sha256"`
	FeedSeq int64  `json:"feed_seq"`
	LogID   string `json:"log_id"`
}

// runBinary runs productsvc with args and env (DB_PATH and the like) to its
// end, and returns its exit code and output.
func runBinary(t testing.TB, env map[string]string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(binPath, args...)
	cmd.Env = childEnv(map[string]string{"API_TOKEN": testToken, "LOG_LEVEL": "warn"}, env)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), out.String()
	}
	if err != nil {
		t.Fatalf("run %s %v: %v", binPath, args, err)
	}
	return 0, out.String()
}

// fillCatalog adds n products straight into the stopped service's SQLite
// file, so that a backup takes long enough to be interrupted.
func fillCatalog(t testing.TB, dbPath string, n int) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+dbPath+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	now := time.Now().UnixMicro()
	if _, err := db.Exec(`WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < ?)
		INSERT INTO products (sku, name, description, category, price_cents, stock, created_at, updated_at)
		SELECT 'FILL-' || n, 'product ' || n, 'a description of product ' || n || ' ' || hex(randomblob(32)),
			'cat', 100, 10, ?, ? FROM i`, n, now, now); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO products_fts (rowid, name, description) SELECT id, name, description FROM products`); err != nil {
		t.Fatal(err)
	}
}

// TestBackupKill9 kills the service with SIGKILL in the middle of a backup:
// nothing is left under a final name, the next start clears what the
// backup left, the next backup succeeds; a restore beside the running
// service is refused; after the service stops, the restore puts the
// backup in place, and a consumer of the old change log is told to resync.
func TestBackupKill9(t *testing.T) {
	if onPostgres() {
		t.Skip("backups are SQLite's; PostgreSQL's are pg_dump's")
	}
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "products.db")
	backupDir := filepath.Join(dir, "backups")
	env := map[string]string{"DB_PATH": dbPath, "BACKUP_DIR": backupDir}
	ctx := context.Background()

	svc, c := startReadyService(t, env)
	mustCreate(t, c, "FIRST", "the first product", 100, nil)
	if code := svc.Stop(30 * time.Second); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}
	fillCatalog(t, dbPath, 200_000)

	// Kill the service while a backup's temporary file exists.
	killed := false
	for attempt := 0; attempt < 5 && !killed; attempt++ {
		svc, c = startReadyService(t, env)
		go c.do(ctx, "POST", "/admin/backups", nil, nil)
		killed = pollUntil(30*time.Second, time.Millisecond, func() bool {
			entries, _ := os.ReadDir(backupDir)
			for _, e := range entries {
				if strings.HasPrefix(e.Name(), ".tmp-") {
					svc.Kill()
					return true
				}
			}
			return false
		})
		if !killed {
			svc.Kill()
		}
	}
	if !killed {
		t.Fatal("never caught a backup in progress to kill")
	}
	entries, _ := os.ReadDir(backupDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "productsvc-") {
			t.Errorf("after SIGKILL during a backup %s is under a final name", e.Name())
		}
	}

	svc, c = startReadyService(t, env)
	entries, _ = os.ReadDir(backupDir)
	if len(entries) != 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("after a restart the backup dir holds %v, want nothing", names)
	}
	r, err := c.do(ctx, "POST", "/admin/backups", nil, nil)
	if err != nil || r.Status != http.StatusCreated {
		t.Fatalf("backup after the crash: %v %v", r, err)
	}
	var man backupManifest
	if err := json.Unmarshal(r.Body, &man); err != nil {
		t.Fatal(err)
	}
	backup := filepath.Join(backupDir, man.Name)
	mustCreate(t, c, "AFTER", "after the backup", 100, nil)
	r, _ = c.do(ctx, "GET", "/events?after=0&limit=1", nil, nil)
	var page struct {
		LogID string `json:"log_id"`
	}
	json.Unmarshal(r.Body, &page)

	// Beside the running service: refused, exit 1, nothing changed.
	code, out := runBinary(t, env, "-restore", backup)
	if code != 1 || !strings.Contains(out, "in use") {
		t.Errorf("restore beside the running service: exit %d, %q; want 1 and a refusal", code, out)
	}
	if code := svc.Stop(30 * time.Second); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}
	code, out = runBinary(t, env, "-restore", backup)
	if code != 0 {
		t.Fatalf("restore: exit %d: %s", code, out)
	}
	t.Logf("restore: %s", out)
	if code, out := runBinary(t, env, "-restore-if-missing", backup); code != 0 || !strings.Contains(out, "nothing restored") {
		t.Errorf("-restore-if-missing over a database: exit %d, %q", code, out)
	}
	if code, out := runBinary(t, env, "-restore"); code != 2 {
		t.Errorf("-restore without a file: exit %d, %q; want 2", code, out)
	}

	svc, c = startReadyService(t, env)
	if _, r, _ := getProduct(ctx, c, 1); r == nil || r.Status != http.StatusOK {
		t.Errorf("GET /products/1 after the restore: %v", r)
	}
	r, err = c.do(ctx, "GET", fmt.Sprintf("/events?after=%d&log_id=%s", man.FeedSeq, page.LogID), nil, nil)
	if err != nil || checkProblem(r, http.StatusGone) != "" || !strings.Contains(string(r.Body), "feed-reset") {
		t.Errorf("GET /events with the old log_id after the restore: %v %v, want 410 feed-reset", r, err)
	}
	r, err = c.do(ctx, "GET", fmt.Sprintf("/events?after=%d", man.FeedSeq+1), nil, nil)
	if err != nil || checkProblem(r, http.StatusGone) != "" {
		t.Errorf("GET /events beyond the restored head: %v %v, want 410", r, err)
	}
}
