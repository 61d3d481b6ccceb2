-- Unique values per tenant (e.g. a contact's email): which stream holds each.
-- key_hash is an HMAC of the normalized value, so no personal data is stored
-- here. Written in the append's own transaction.
CREATE TABLE reservations (
    tenant_id    text        NOT NULL,
    kind         text        NOT NULL,
    key_hash     bytea       NOT NULL,
    stream_id    uuid        NOT NULL,
    reserved_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, kind, key_hash)
);
CREATE INDEX reservations_by_stream ON reservations (tenant_id, stream_id);

-- Lets one statement abort itself with a clear message and a unique-violation
-- SQLSTATE (the writer's guarded write uses it when a claim was taken).
CREATE FUNCTION crm_require(ok boolean, message text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION '%', message USING ERRCODE = 'unique_violation';
    END IF;
    RETURN true;
END
$$;
