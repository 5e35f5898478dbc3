-- Stored responses of writes made with an Idempotency-Key.
CREATE TABLE idempotency_keys (
	scope       TEXT    NOT NULL,
	key         TEXT    NOT NULL,
	fingerprint TEXT    NOT NULL,
	status      INTEGER NOT NULL,
	body        BLOB    NOT NULL,
	product_id  INTEGER NOT NULL,
	version     INTEGER NOT NULL,
	created_at  INTEGER NOT NULL, -- Unix microseconds
	PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
