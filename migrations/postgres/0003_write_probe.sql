-- A row the write breaker's probe rewrites to see if writes work again.
CREATE TABLE write_probe (id integer PRIMARY KEY CHECK (id = 1), at timestamptz NOT NULL);
