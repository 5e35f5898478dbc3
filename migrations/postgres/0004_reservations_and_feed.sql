-- Reservations, and the change feed every write appends to (see SQLite's
-- migration 6). Transactions here commit concurrently, so an event's seq is
-- not taken at insert: id orders inserts, and seq is given to committed
-- events in id order by one sequencer at a time (see sequenceEvents), so a
-- reader never sees seq N+1 before seq N.
ALTER TABLE products ADD COLUMN reserved bigint NOT NULL DEFAULT 0;
ALTER TABLE products ADD CONSTRAINT products_reserved_within_stock CHECK (reserved BETWEEN 0 AND stock);
CREATE TABLE reservations (
	id         text PRIMARY KEY,
	reference  text NOT NULL,
	state      text NOT NULL,
	created_at timestamptz NOT NULL,
	expires_at timestamptz NOT NULL,
	updated_at timestamptz NOT NULL
);
CREATE INDEX reservations_reference ON reservations (reference, created_at);
CREATE INDEX reservations_due ON reservations (expires_at) WHERE state = 'held';
CREATE TABLE reservation_lines (
	reservation_id text NOT NULL REFERENCES reservations (id),
	line           integer NOT NULL,
	product_id     bigint NOT NULL,
	quantity       bigint NOT NULL,
	holding        integer NOT NULL,
	expires_at     timestamptz NOT NULL,
	PRIMARY KEY (reservation_id, line)
);
CREATE INDEX reservation_lines_holding ON reservation_lines (product_id, expires_at) WHERE holding = 1;
CREATE TABLE events (
	id             bigserial PRIMARY KEY,
	seq            bigint UNIQUE,
	type           text NOT NULL,
	occurred_at    timestamptz NOT NULL,
	product_id     bigint,
	version        bigint,
	reservation_id text,
	state          text,
	data           jsonb
);
CREATE INDEX events_unsequenced ON events (id) WHERE seq IS NULL;
CREATE INDEX events_occurred ON events (occurred_at);
CREATE TABLE feed_state (id integer PRIMARY KEY CHECK (id = 1), trimmed_through bigint NOT NULL);
INSERT INTO feed_state (id, trimmed_through) VALUES (1, 0);
