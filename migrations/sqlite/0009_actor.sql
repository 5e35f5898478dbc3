-- Who made each write: the credential's name (or a token's subject) on its
-- change-feed event, and on a reservation the one who holds it. NULL for
-- what the service does by itself (an expiry) and for rows from before.
ALTER TABLE events ADD COLUMN actor TEXT;
ALTER TABLE reservations ADD COLUMN created_by TEXT;
-- The open holds of one holder, summed when a hold is capped (max_held).
CREATE INDEX reservations_held_by ON reservations (created_by) WHERE state = 'held';
