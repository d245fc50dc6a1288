-- The request id the caller sent (the bridge's X-Request-Id), kept to join usage with logs. It is not unique: a
-- client may send the same one twice, so the record's own key stays request_id, which the core mints.
ALTER TABLE usage_records ADD COLUMN caller_request_id text NOT NULL DEFAULT '';
