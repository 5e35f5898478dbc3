-- The writer maintains the full-text index once per group commit (see
-- ftsBatch) instead of triggers doing it row by row: FTS5 flushes its
-- pending index at every statement that touches it.
DROP TRIGGER products_fts_insert;
DROP TRIGGER products_fts_delete;
DROP TRIGGER products_fts_update;
