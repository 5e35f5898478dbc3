-- The change log's identity (see SQLite's migration 7).
ALTER TABLE feed_state ADD COLUMN log_id text NOT NULL DEFAULT '';
UPDATE feed_state SET log_id = replace(gen_random_uuid()::text, '-', '') WHERE id = 1;
