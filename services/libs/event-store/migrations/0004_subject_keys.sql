-- Crypto-shredding (DESIGN §6): one random data key per data subject (a
-- contact, a lead). Personal fields of the subject's events are encrypted
-- under it; deleting the row makes them unreadable everywhere, although the
-- events themselves never change.
CREATE TABLE subject_keys (
    tenant_id   text        NOT NULL,
    subject_id  uuid        NOT NULL,
    key         bytea       NOT NULL CHECK (length(key) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, subject_id)
);

-- Subjects whose key was destroyed, so that no new key is ever made for them.
CREATE TABLE erased_subjects (
    tenant_id   text        NOT NULL,
    subject_id  uuid        NOT NULL,
    erased_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, subject_id)
);
