-- What writes made with an Idempotency-Key produced. product is NULL only
-- inside the transaction that claimed the key.
CREATE TABLE idempotency_keys (
	scope       text NOT NULL,
	key         text NOT NULL,
	fingerprint text NOT NULL,
	product     jsonb,
	created_at  timestamptz NOT NULL,
	PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
