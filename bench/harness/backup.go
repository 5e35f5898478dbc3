package main

// The report's backup rows: an online backup of a large SQLite catalog,
// alone and beside a write load.

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// backupManifest is the part of POST /admin/backups's answer the report uses.
type backupManifest struct {
	Size       int64 `json:"size"`
	DurationMS int64 `json:"duration_ms"`
}

func readBackupManifest(path string) (backupManifest, error) {
	var m backupManifest
	js, err := os.ReadFile(path)
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(js, &m); err != nil {
		return m, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// backupTable writes the backup rows from backup.tsv: "alone" and the
// manifest of a backup taken with no load; "pair", the repeat, the wrk
// output of a writes run without a backup, that of the same run with a
// backup beside it, and that backup's manifest. A missing list is none.
func backupTable(b *strings.Builder, dir string, meta map[string]string) error {
	rows, err := readTSV(dir + "/backup.tsv")
	if err != nil {
		return err
	}
	if len(rows) == 0 {
		return nil
	}
	fmt.Fprintf(b, "\n## Backups (SQLite)\n\n")
	fmt.Fprintf(b, "productsvc on SQLite (DB_SYNC=full) with BACKUP_DIR; %s. POST /admin/backups copies the live database with SQLite's online backup API, writes the copy back to disk a MiB at a time and fsyncs it, checks it (PRAGMA integrity_check), hashes it and renames it into place; its time is the manifest's duration_ms, from the start to the manifest. Then pairs of wrk runs of workload i's writes (half creates, half stock adjustments over the whole catalog) from 8 connections, the same length: one without a backup, then one with a backup started 1 s in. Target: writes' p99 at most 10 ms more beside a backup than without.\n\n", orDash(meta["backup_data"], ""))
	var diffs []float64
	fmt.Fprintf(b, "| run | backup | backup time | size | MB/s | writes/s without | p99 without | writes/s with | p99 with | p99 difference |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rows {
		switch {
		case r[0] == "alone" && len(r) >= 2:
			m, err := readBackupManifest(r[1])
			if err != nil {
				return err
			}
			fmt.Fprintf(b, "| — | no load | %.2f s | %.1f MB | %.0f | — | — | — | — | — |\n",
				float64(m.DurationMS)/1e3, float64(m.Size)/1e6, mbPerS(m))
		case r[0] == "pair" && len(r) >= 5:
			without, err := readWrk(r[2])
			if err != nil {
				return err
			}
			with, err := readWrk(r[3])
			if err != nil {
				return err
			}
			m, err := readBackupManifest(r[4])
			if err != nil {
				return err
			}
			d := with.p99 - without.p99
			diffs = append(diffs, d)
			fmt.Fprintf(b, "| %s | beside writes | %.2f s | %.1f MB | %.0f | %.0f | %s | %.0f | %s | %+.1f ms |\n",
				r[1], float64(m.DurationMS)/1e3, float64(m.Size)/1e6, mbPerS(m),
				without.reqPerSec, fmtMS(without.p99), with.reqPerSec, fmtMS(with.p99), d)
		}
	}
	if len(diffs) > 0 {
		verdict := "met"
		if median(diffs) > 10 {
			verdict = "not met"
		}
		fmt.Fprintf(b, "\nMedian p99 difference: %+.1f ms over %d pairs; target (≤ 10 ms) %s.\n", median(diffs), len(diffs), verdict)
	}
	return nil
}

func mbPerS(m backupManifest) float64 {
	if m.DurationMS <= 0 {
		return 0
	}
	return float64(m.Size) / 1e6 / (float64(m.DurationMS) / 1e3)
}

func readWrk(path string) (wrkRun, error) {
	out, err := os.ReadFile(path)
	if err != nil {
		return wrkRun{}, err
	}
	run, err := parseWrk(out)
	if err != nil {
		return wrkRun{}, fmt.Errorf("%s: %w", path, err)
	}
	return run, nil
}
