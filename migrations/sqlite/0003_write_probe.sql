-- A row the write breaker's probe rewrites to see if writes work again.
CREATE TABLE write_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
