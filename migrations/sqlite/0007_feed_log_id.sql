-- The change log's identity: made when the database is created (or this
-- migration first runs), and renewed by a restore, so a consumer can tell
-- one log's positions from another's.
ALTER TABLE feed_state ADD COLUMN log_id TEXT NOT NULL DEFAULT '';
UPDATE feed_state SET log_id = lower(hex(randomblob(16))) WHERE id = 1;
