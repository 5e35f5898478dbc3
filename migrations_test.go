package main

import (
	"crypto/sha256"
	"encoding/hex"
	"io/fs"
	"testing"
)

// TestMigrations_unchanged holds the digest of every released migration: a
// migration runs once per database, so changing one after release leaves
// databases that ran the old text. Add a new file instead, and its digest
// here.
func TestMigrations_unchanged(t *testing.T) {
	want := map[string]string{
		"migrations/postgres/0001_products.sql":              "017d556d247e26c26c5db911fd0c34d22768b65cdae655a35449fa1a82d70d8d",
		"migrations/postgres/0002_idempotency_keys.sql":      "e329657fa6c79dc3fcf5859cd4df74b157207d866a29c8d3dcd1674c411af855",
		"migrations/postgres/0003_write_probe.sql":           "4d586266212a1b58b0d62777b30d11c380aea65773ee3027b07372403a782956",
		"migrations/postgres/0004_reservations_and_feed.sql": "bff735e479f024946ad7fa0e424bdbcc4b1d4515d350e230443872ff5facef12",
		"migrations/sqlite/0001_products.sql":                "a913bfe3c71836d521f71c5fdf20c18a9fe36918f97da77eed29c6af87ff2635",
		"migrations/sqlite/0002_idempotency_keys.sql":        "2e489fa863a1acf270048d7c0d03d17713758ecb8590b05003fff1e58c28146b",
		"migrations/sqlite/0003_write_probe.sql":             "ac6f6bfcb842af5c281e3c69f80da9353094c2b2026efd966b5ec36f6da177ad",
		"migrations/sqlite/0004_fts_by_writer.sql":           "072e593778e567a834cd2120054b86d7916112e9e277c3dcfb5c4eccfe85f5bf",
		"migrations/sqlite/0005_idempotency_snapshot.sql":    "75608d2ecb20ae21df5626d4c6799a2257b1b4f44758876f0e3bd96a70fa5c4f",
		"migrations/sqlite/0006_reservations_and_feed.sql":   "340fb0fe6495cc467420f48a0f66a4bb8d62ee1c52b8eb4166669d165be46d55",
		"migrations/postgres/0005_feed_log_id.sql":           "a181438714865142d45800020d14351e07a45d258418438d7d047d63ff8ecd81",
		"migrations/sqlite/0007_feed_log_id.sql":             "88aa622a10720f1590b314d7adc02b9052cbdd22aeddf8d238800ff87ec5eb8b",
		"migrations/sqlite/0008_relay.sql":                   "792390f53f3b801fbd7f682b92342ccbf06d25a7e7dfcb7b8593923e3da5446c",
		"migrations/postgres/0006_relay.sql":                 "33c1383c274cf68fed37fa8f07932017302dce7b7054490c8e71282ec319c181",
		"migrations/postgres/0007_actor.sql":                 "81fff6ef990f952913de6ac0dccd7fd8892138ada56289327e786a452c0a2365",
		"migrations/sqlite/0009_actor.sql":                   "ac2b5288051266af90d5ed87ceecacd02913916c4f985c0190f00c3da725b967",
	}
	got := map[string]string{}
	err := fs.WalkDir(migrationFiles, "migrations", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := migrationFiles.ReadFile(path)
		sum := sha256.Sum256(b)
		got[path] = hex.EncodeToString(sum[:])
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for path, sum := range got {
		switch w, ok := want[path]; {
		case !ok:
			t.Errorf("%s is new: add its digest %s to this test", path, sum)
		case w != sum:
			t.Errorf("%s changed (digest %s, released as %s): a released migration never changes; add a new one", path, sum, w)
		}
	}
	for path := range want {
		if _, ok := got[path]; !ok {
			t.Errorf("%s was released and is gone", path)
		}
	}
	if len(migrations) != 9 || len(pgMigrations) != 7 {
		t.Errorf("migrations: %d for SQLite, %d for PostgreSQL, want 9 and 7", len(migrations), len(pgMigrations))
	}
}
