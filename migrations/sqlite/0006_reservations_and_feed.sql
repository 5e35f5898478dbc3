-- Reservations, and the change feed every write appends to. A line repeats
-- its hold's expiry and whether it still holds, so the units held on a
-- product are one indexed sum. reserved can never pass stock.
ALTER TABLE products ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0 CHECK (reserved BETWEEN 0 AND stock);
CREATE TABLE reservations (
	id         TEXT    PRIMARY KEY,
	reference  TEXT    NOT NULL,
	state      TEXT    NOT NULL,
	created_at INTEGER NOT NULL,
	expires_at INTEGER NOT NULL,
	updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX reservations_reference ON reservations (reference, created_at);
CREATE INDEX reservations_due ON reservations (expires_at) WHERE state = 'held';
CREATE TABLE reservation_lines (
	reservation_id TEXT    NOT NULL,
	line           INTEGER NOT NULL,
	product_id     INTEGER NOT NULL,
	quantity       INTEGER NOT NULL,
	holding        INTEGER NOT NULL,
	expires_at     INTEGER NOT NULL,
	PRIMARY KEY (reservation_id, line)
) WITHOUT ROWID;
CREATE INDEX reservation_lines_holding ON reservation_lines (product_id, expires_at) WHERE holding = 1;
CREATE TABLE events (
	seq            INTEGER PRIMARY KEY AUTOINCREMENT, -- commit order: one writer commits in order
	type           TEXT    NOT NULL,
	occurred_at    INTEGER NOT NULL,
	product_id     INTEGER,
	version        INTEGER,
	reservation_id TEXT,
	state          TEXT,
	data           BLOB
);
CREATE INDEX events_occurred ON events (occurred_at);
CREATE TABLE feed_state (id INTEGER PRIMARY KEY CHECK (id = 1), trimmed_through INTEGER NOT NULL);
INSERT INTO feed_state (id, trimmed_through) VALUES (1, 0);
