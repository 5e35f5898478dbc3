//go:build unix

package main

import (
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// syscallSIGHUP is what run's signal handling receives on SIGHUP.
const syscallSIGHUP = syscall.SIGHUP

// TestRun_SIGHUPReloadsTokensFile sends SIGHUP to the process while run
// serves, and checks that the tokens file is read again. The file keeps its
// size and modification time, so only the signal can have told.
func TestRun_SIGHUPReloadsTokensFile(t *testing.T) {
	dir := t.TempDir()
	path := writeTokensFile(t, filepath.Join(dir, "tokens"), "alice catalog:write "+digestOf("token-aaaa"))
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	svc := runService(t, map[string]string{"ADDR": "127.0.0.1:0", "DB_PATH": filepath.Join(dir, "products.db"), "API_TOKENS_FILE": path})
	base := "http://" + svc.listeningAddr(t)
	status := func(token string) int {
		req, _ := http.NewRequestWithContext(t.Context(), "DELETE", base+"/products/1", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := status("token-aaaa"); got != http.StatusNotFound {
		t.Fatalf("DELETE with alice's token = %d, want 404 (authorised, no such product)", got)
	}
	writeTokensFile(t, path, "bobby catalog:write "+digestOf("token-bbbb"))
	if err := os.Chtimes(path, st.ModTime(), st.ModTime()); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "bobby's token accepted after SIGHUP", func() bool { return status("token-bbbb") == http.StatusNotFound })
	if got := status("token-aaaa"); got != http.StatusUnauthorized {
		t.Errorf("DELETE with alice's dropped token = %d, want 401", got)
	}
	// The log is written in batches: wait for the line.
	waitFor(t, 10*time.Second, `the "tokens file reloaded" log line, why SIGHUP`, func() bool {
		for _, l := range svc.stdout.logLines() {
			if l["msg"] == "tokens file reloaded" && l["why"] == "SIGHUP" {
				return true
			}
		}
		return false
	})
}
