-- Products, their sort indexes and the full-text index.
CREATE TABLE products (
	id          INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, so (id, version) is unique forever
	sku         TEXT    NOT NULL UNIQUE,
	name        TEXT    NOT NULL,
	description TEXT    NOT NULL DEFAULT '',
	category    TEXT    NOT NULL DEFAULT '',
	price_cents INTEGER NOT NULL CHECK (price_cents BETWEEN 0 AND 1000000000000),
	currency    TEXT    NOT NULL DEFAULT 'USD',
	stock       INTEGER NOT NULL DEFAULT 0 CHECK (stock BETWEEN 0 AND 1000000000000),
	version     INTEGER NOT NULL DEFAULT 1,
	created_at  INTEGER NOT NULL, -- Unix microseconds, UTC
	updated_at  INTEGER NOT NULL
);
CREATE INDEX products_name_id ON products (name, id);
CREATE INDEX products_price_id ON products (price_cents, id);
CREATE INDEX products_created_id ON products (created_at, id);
CREATE INDEX products_category_id ON products (category, id);
CREATE INDEX products_category_price_id ON products (category, price_cents, id);
CREATE VIRTUAL TABLE products_fts USING fts5(
	name, description, content='products', content_rowid='id',
	tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER products_fts_insert AFTER INSERT ON products BEGIN
	INSERT INTO products_fts (rowid, name, description) VALUES (new.id, new.name, new.description);
END;
CREATE TRIGGER products_fts_delete AFTER DELETE ON products BEGIN
	INSERT INTO products_fts (products_fts, rowid, name, description) VALUES ('delete', old.id, old.name, old.description);
END;
CREATE TRIGGER products_fts_update AFTER UPDATE OF name, description ON products BEGIN
	INSERT INTO products_fts (products_fts, rowid, name, description) VALUES ('delete', old.id, old.name, old.description);
	INSERT INTO products_fts (rowid, name, description) VALUES (new.id, new.name, new.description);
END;
