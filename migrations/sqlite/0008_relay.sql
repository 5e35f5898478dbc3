-- The relay's position in the change log: every event up to seq position
-- of log log_id was confirmed by the broker. An empty log_id is no log yet:
-- the relay starts the feed's log from its oldest kept event.
CREATE TABLE relay_state (
	id       INTEGER PRIMARY KEY CHECK (id = 1),
	log_id   TEXT    NOT NULL,
	position INTEGER NOT NULL
);
INSERT INTO relay_state (id, log_id, position) VALUES (1, '', 0);
