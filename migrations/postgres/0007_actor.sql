-- Who made each write (see SQLite's migration 9): the credential's name
-- (or a token's subject) on its change-feed event, and on a reservation
-- the one who holds it. NULL for what the service does by itself (an
-- expiry) and for rows from before.
ALTER TABLE events ADD COLUMN actor text;
ALTER TABLE reservations ADD COLUMN created_by text;
-- The open holds of one holder, summed when a hold is capped (max_held).
CREATE INDEX reservations_held_by ON reservations (created_by) WHERE state = 'held';
