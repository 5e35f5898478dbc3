package main

// -restore and -restore-if-missing: putting a SQLite backup in place of
// DB_PATH, refusing anything that could do harm; -renew-log-id: a new
// identity for the change log after a database was restored by other
// means (pg_restore).

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"
)

// restoreSQLite puts the backup file src in place of the database at
// dbPath and prints what it did to out. With ifMissing it does so only if
// dbPath does not exist (and then does nothing, successfully).
//
// It refuses, changing nothing, while a process holds the database (the
// file lock, held here until the end), when a manifest beside src
// (src.json) gives another SHA-256 or size, when the copy fails PRAGMA
// integrity_check, and when its schema is newer than this binary's. The
// backup is copied to a temporary file in dbPath's directory, checked,
// given a new log_id (so that positions in the old change log are
// answered 410 feed-reset) and fsynced; the current database is kept
// beside dbPath under a name with the time (its -wal and -shm with it),
// and the copy is renamed over dbPath: at any moment dbPath is the old
// database or the new one, never missing or partial.
func restoreSQLite(ctx context.Context, dbPath, src string, ifMissing bool, out io.Writer) error {
	refuse := func(format string, args ...any) error {
		return fmt.Errorf("restore refused, nothing changed: "+format, args...)
	}
	if ifMissing && exists(dbPath) {
		fmt.Fprintf(out, "DB_PATH %s exists; nothing restored (-restore-if-missing)\n", dbPath)
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return refuse("%v", err)
	}
	defer in.Close()
	dir := filepath.Dir(dbPath)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return refuse("%v", err)
	}
	unlock, err := lockDatabase(dbPath)
	if err != nil {
		return refuse("%v", err) // %v: a held lock is a refusal (exit 1), not a usage error
	}
	defer unlock()

	man, err := readManifest(src + ".json")
	haveManifest := err == nil
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return refuse("%v", err)
	}

	// The copy is made in dbPath's directory, so the rename that puts it
	// in place never crosses a device.
	tmp, err := os.CreateTemp(dir, ".restore-*.db")
	if err != nil {
		return refuse("%v", err)
	}
	tmpPath := tmp.Name()
	defer removeDB(tmpPath) // gone once renamed; else what a failure left
	h := sha256.New()
	size, err := io.Copy(io.MultiWriter(tmp, h), in)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return refuse("copy %s: %v", src, err)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if haveManifest && (sum != man.SHA256 || size != man.Size) {
		return refuse("%s does not match its manifest: sha-256 %s and %d bytes, the manifest says %s and %d bytes",
			src, sum, size, man.SHA256, man.Size)
	}

	got, newID, err := prepareRestored(ctx, tmpPath)
	if err != nil {
		return refuse("%s: %v", src, err)
	}
	if err := syncFile(tmpPath); err != nil {
		return refuse("%v", err)
	}

	aside := ""
	if exists(dbPath) {
		aside = dbPath + ".before-restore-" + time.Now().UTC().Format("20060102T150405Z")
		if err := moveAside(ctx, dbPath, aside); err != nil {
			return fmt.Errorf("restore failed; DB_PATH %s is unchanged: %w", dbPath, err)
		}
	}
	if err := os.Rename(tmpPath, dbPath); err != nil {
		return fmt.Errorf("restore failed; DB_PATH %s is unchanged: %w", dbPath, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("restore: %w", err)
	}

	verified := "no manifest beside it"
	if haveManifest {
		verified = "matches its manifest"
	}
	fmt.Fprintf(out, "restored %s to %s\n", src, dbPath)
	fmt.Fprintf(out, "  sha-256 %s, %d bytes (%s); integrity_check ok\n", sum, size, verified)
	fmt.Fprintf(out, "  schema version %d, change feed up to seq %d\n", got.SchemaVersion, got.FeedSeq)
	fmt.Fprintf(out, "  new log_id %s (was %s): consumers holding positions of the old log get 410 feed-reset and resync\n", newID, got.LogID)
	if aside != "" {
		fmt.Fprintf(out, "  the previous database is kept as %s\n", aside)
	}
	return nil
}

// prepareRestored checks the database file at path (integrity, a schema
// this binary knows), makes it a rollback-journal file whole on its own,
// and gives its change log a new identity. It returns what it found, and
// the new log_id.
func prepareRestored(ctx context.Context, path string) (backupManifest, string, error) {
	db, err := sql.Open("sqlite", sqliteURI(path, "mode=rw"))
	if err != nil {
		return backupManifest{}, "", err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, `PRAGMA journal_mode=DELETE`); err != nil {
		return backupManifest{}, "", fmt.Errorf("not a SQLite database: %w", err)
	}
	man, err := checkDatabase(ctx, db)
	if err != nil {
		return backupManifest{}, "", err
	}
	id := "(made when the service first opens it: its schema predates log_id)"
	if man.LogID != "" {
		if err := db.QueryRowContext(ctx, `UPDATE feed_state SET log_id = lower(hex(randomblob(16))) WHERE id = 1 RETURNING log_id`).Scan(&id); err != nil {
			return backupManifest{}, "", fmt.Errorf("renew log_id: %w", err)
		}
	}
	return man, id, db.Close()
}

// moveAside keeps the database at dbPath as aside: its WAL is first
// checkpointed into the main file, which is then linked (copied where
// links are not possible) to aside; a -wal, -shm or -journal left is moved
// with it. dbPath itself stays until the restored file is renamed over it.
func moveAside(ctx context.Context, dbPath, aside string) error {
	if db, err := sql.Open("sqlite", sqliteURI(dbPath, "mode=rw")); err == nil {
		// Best effort: a database too damaged to checkpoint keeps its WAL
		// beside it, moved below.
		db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`)
		db.Close()
	}
	if err := os.Link(dbPath, aside); err != nil {
		if err := copyFile(dbPath, aside); err != nil {
			return fmt.Errorf("keep %s as %s: %w", dbPath, aside, err)
		}
	}
	for _, suffix := range []string{"-wal", "-shm", "-journal"} {
		if exists(dbPath + suffix) {
			if err := os.Rename(dbPath+suffix, aside+suffix); err != nil {
				return fmt.Errorf("keep %s: %w", dbPath+suffix, err)
			}
		}
	}
	return syncDir(filepath.Dir(dbPath))
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// renewLogID gives the change log of the database cfg selects a new
// identity, so consumers holding positions of the old one get 410
// feed-reset: for a database restored by other means (pg_restore, a
// PostgreSQL base backup). On SQLite, -restore does it already.
func renewLogID(ctx context.Context, cfg StoreConfig, out io.Writer) error {
	var old, id string
	if cfg.DatabaseURL != "" {
		conn, err := pgx.Connect(ctx, cfg.DatabaseURL)
		if err != nil {
			return fmt.Errorf("renew log_id: %w", err)
		}
		defer conn.Close(ctx)
		err = conn.QueryRow(ctx, `UPDATE feed_state f SET log_id = replace(gen_random_uuid()::text, '-', '')
			FROM feed_state o WHERE f.id = 1 AND o.id = 1 RETURNING o.log_id, f.log_id`).Scan(&old, &id)
		if err != nil {
			return fmt.Errorf("renew log_id: %w", err)
		}
	} else {
		if !exists(cfg.Path) {
			return fmt.Errorf("renew log_id: no database at DB_PATH %s", cfg.Path)
		}
		unlock, err := lockDatabase(cfg.Path)
		if err != nil {
			return fmt.Errorf("renew log_id refused: %v", err)
		}
		defer unlock()
		db, err := sql.Open("sqlite", sqliteURI(cfg.Path, "mode=rw&_pragma=busy_timeout(5000)"))
		if err != nil {
			return fmt.Errorf("renew log_id: %w", err)
		}
		defer db.Close()
		if err := db.QueryRowContext(ctx, `SELECT log_id FROM feed_state WHERE id = 1`).Scan(&old); err != nil {
			return fmt.Errorf("renew log_id: %w", err)
		}
		if err := db.QueryRowContext(ctx, `UPDATE feed_state SET log_id = lower(hex(randomblob(16))) WHERE id = 1 RETURNING log_id`).Scan(&id); err != nil {
			return fmt.Errorf("renew log_id: %w", err)
		}
	}
	fmt.Fprintf(out, "new log_id %s (was %s): consumers holding positions of the old log get 410 feed-reset and resync\n", id, old)
	return nil
}
