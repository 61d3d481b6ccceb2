-- Where each log follower (the relay, later projections that keep their
-- checkpoint here) has got to: the last global position it has fully handled.
CREATE TABLE checkpoints (
    name        text        PRIMARY KEY,
    position    bigint      NOT NULL CHECK (position >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
