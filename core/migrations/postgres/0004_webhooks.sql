-- Webhook delivery: the endpoints' delivery state, the delivery log (which is also the
-- queue the dispatchers work from) and every attempt made.

-- One row per endpoint. Endpoints created through the API in standalone mode keep their
-- spec and signing secret here (in a cluster they are Webhook resources and Secrets);
-- endpoints of the platform config have only their state here.
CREATE TABLE webhooks (
    name               TEXT PRIMARY KEY,
    display_name       TEXT,
    spec               TEXT,
    secret             TEXT,
    created_by         TEXT,
    created_at         BIGINT NOT NULL,
    active             BIGINT NOT NULL DEFAULT 1,
    deactivated_reason TEXT,
    deactivated_at     BIGINT,
    -- Calls and failures since the endpoint was last (re)activated: what the
    -- deactivation rule judges.
    window_calls       BIGINT NOT NULL DEFAULT 0,
    window_failures    BIGINT NOT NULL DEFAULT 0,
    -- The signing key last seen (base64), and the one it replaced, which keeps signing
    -- beside it until previous_key_until so receivers can roll over.
    signing_key        TEXT,
    previous_key       TEXT,
    previous_key_until BIGINT
);

-- One row per event and endpoint. The body is kept as sent, so that every retry and
-- replay signs and sends the same bytes under the same webhook-id.
CREATE TABLE webhook_deliveries (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook          TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    event_timestamp  BIGINT NOT NULL,
    body             TEXT NOT NULL,
    -- PENDING, SUCCESS or FAILED.
    status           TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    -- A dispatcher holds a delivery until this time while it sends it; a crashed
    -- dispatcher's deliveries are taken over once it passes.
    lease_until      BIGINT,
    created_at       BIGINT NOT NULL,
    completed_at     BIGINT,
    last_status_code BIGINT,
    last_error       TEXT,
    UNIQUE (webhook, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook, next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook, seq);
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at);

CREATE TABLE webhook_attempts (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery      BIGINT NOT NULL,
    webhook       TEXT NOT NULL,
    attempt       BIGINT NOT NULL,
    started_at    BIGINT NOT NULL,
    duration_ms   BIGINT NOT NULL,
    status_code   BIGINT,
    success       BIGINT NOT NULL,
    error         TEXT,
    response_body TEXT
);
CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts (webhook, started_at);
CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery);
