-- An idempotency record keeps what its write produced; the handler shapes
-- the replayed response, so no status is stored. product_id and version
-- are no longer read.
ALTER TABLE idempotency_keys DROP COLUMN status;
ALTER TABLE idempotency_keys RENAME COLUMN body TO product;
