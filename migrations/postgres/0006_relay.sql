-- The relay's position in the change log (see SQLite's migration 8).
CREATE TABLE relay_state (
	id       integer PRIMARY KEY CHECK (id = 1),
	log_id   text   NOT NULL,
	position bigint NOT NULL
);
INSERT INTO relay_state (id, log_id, position) VALUES (1, '', 0);
