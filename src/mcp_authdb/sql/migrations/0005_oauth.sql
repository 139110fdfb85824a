-- OAuth state of the MCP server: clients, pending authorizations,
-- authorization codes and grants.
--
-- oauth_clients holds clients registered by Dynamic Client Registration
-- (kind 'registered', with the source address of the request in
-- registered_from) and cached Client ID Metadata Documents (kind
-- 'metadata_document', fetched again after document_expires_at). metadata is
-- the client's registration as JSON without its secret, and first_session_at
-- is set by the client's first code exchange.
--
-- oauth_pending_authorizations holds an authorization request until the
-- upstream provider redirects back. Until the user approves it on the consent
-- page it is keyed by the keyed hash of its consent request id, and
-- consented_at and binding_hash are NULL. Approval re-keys it by the keyed
-- hash of the upstream state, sets consented_at, and stores the keyed hash of
-- the browser binding cookie in binding_hash. oauth_codes holds the authorization codes given to clients, keyed by
-- their keyed hash and used once: the exchange sets used_at and the family_id
-- of the session it created, and the row stays until it expires, so that a
-- second use of the code can revoke that family. oauth_grants holds, for each
-- user session family (user_sessions.family_id), its client, resource and
-- upstream tokens.
-- Every *_encrypted column is AES-256-GCM output of the application, whose
-- key the database never sees.
--
-- cleanup_oauth_state(unused_age) deletes expired pending authorizations and
-- codes (used or not), grants whose family has no user_sessions row left, registered
-- clients older than unused_age that never led to a session, and metadata
-- documents that expired more than unused_age ago. It keeps every client with
-- a live session (not revoked, greatest(expires_at, refresh_expires_at) after
-- now()) or with an unexpired pending authorization or code, and returns the
-- number of rows it deleted, not counting rows deleted by ON DELETE CASCADE.
--
-- Idempotent: tables and indexes are created only when missing, and so is
-- the function, so running this file again changes nothing and never undoes
-- a later migration.

CREATE TABLE IF NOT EXISTS oauth_clients (
    client_id text PRIMARY KEY CHECK (length(client_id) BETWEEN 1 AND 2048),
    metadata jsonb NOT NULL,
    client_secret_encrypted bytea,
    kind varchar(20) NOT NULL
        CHECK (kind IN ('registered', 'metadata_document')),
    registered_from varchar(64),
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    document_expires_at timestamp with time zone,
    first_session_at timestamp with time zone
);

CREATE INDEX IF NOT EXISTS idx_oauth_clients_source_created
    ON oauth_clients (registered_from, created_at);

CREATE INDEX IF NOT EXISTS idx_oauth_clients_unused
    ON oauth_clients (created_at)
    WHERE first_session_at IS NULL;

CREATE TABLE IF NOT EXISTS oauth_pending_authorizations (
    state_hash varchar(255) PRIMARY KEY,
    client_id text NOT NULL REFERENCES oauth_clients ON DELETE CASCADE,
    redirect_uri text NOT NULL,
    redirect_uri_provided_explicitly boolean NOT NULL,
    client_state text,
    scopes text[] NOT NULL,
    code_challenge varchar(128) NOT NULL,
    resource text NOT NULL,
    upstream_verifier_encrypted bytea NOT NULL,
    binding_hash varchar(255),
    consented_at timestamp with time zone,
    expires_at timestamp with time zone NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    CHECK ((binding_hash IS NULL) = (consented_at IS NULL))
);

CREATE INDEX IF NOT EXISTS idx_oauth_pending_expires
    ON oauth_pending_authorizations (expires_at);

CREATE TABLE IF NOT EXISTS oauth_codes (
    code_hash varchar(255) PRIMARY KEY,
    client_id text NOT NULL REFERENCES oauth_clients ON DELETE CASCADE,
    redirect_uri text NOT NULL,
    redirect_uri_provided_explicitly boolean NOT NULL,
    scopes text[] NOT NULL,
    code_challenge varchar(128) NOT NULL,
    resource text NOT NULL,
    user_id varchar(255) NOT NULL,
    subscription_level varchar(50) NOT NULL,
    upstream_access_encrypted bytea,
    upstream_refresh_encrypted bytea,
    upstream_issued_at timestamp with time zone,
    upstream_expires_at timestamp with time zone,
    expires_at timestamp with time zone NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    used_at timestamp with time zone,
    family_id uuid
);

CREATE INDEX IF NOT EXISTS idx_oauth_codes_expires
    ON oauth_codes (expires_at);

CREATE TABLE IF NOT EXISTS oauth_grants (
    family_id uuid PRIMARY KEY,
    client_id text NOT NULL REFERENCES oauth_clients ON DELETE CASCADE,
    resource text NOT NULL,
    user_id varchar(255) NOT NULL,
    upstream_access_encrypted bytea,
    upstream_refresh_encrypted bytea,
    upstream_issued_at timestamp with time zone,
    upstream_expires_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS idx_oauth_grants_client_id
    ON oauth_grants (client_id);

DO $migration$
BEGIN
    IF to_regprocedure('cleanup_oauth_state(interval)') IS NULL THEN
        CREATE FUNCTION cleanup_oauth_state(unused_age interval) RETURNS bigint
            LANGUAGE plpgsql
            AS $function$
        DECLARE
            deleted bigint := 0;
            step bigint;
        BEGIN
            IF unused_age IS NULL OR unused_age < interval '0' THEN
                RAISE EXCEPTION 'unused_age must not be negative, got %', unused_age
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;

            DELETE FROM oauth_pending_authorizations WHERE expires_at < now();
            GET DIAGNOSTICS step = ROW_COUNT;
            deleted := deleted + step;

            DELETE FROM oauth_codes WHERE expires_at < now();
            GET DIAGNOSTICS step = ROW_COUNT;
            deleted := deleted + step;

            -- A grant is written in the transaction that inserts its family's
            -- first session row, so a grant without any row is one whose
            -- sessions all ended and were deleted.
            DELETE FROM oauth_grants g
            WHERE NOT EXISTS (
                SELECT FROM user_sessions s WHERE s.family_id = g.family_id
            );
            GET DIAGNOSTICS step = ROW_COUNT;
            deleted := deleted + step;

            -- A client is kept while a session family of its grants is live
            -- (not revoked and not ended), or while a sign-in through it is
            -- under way. The code exchange sets first_session_at on the
            -- client's row, and this DELETE rechecks a row that changed
            -- while it waited for the row's lock, so it reads that value.
            DELETE FROM oauth_clients c
            WHERE (
                    (c.kind = 'registered'
                     AND c.first_session_at IS NULL
                     AND c.created_at < now() - unused_age)
                    OR (c.kind = 'metadata_document'
                        AND c.document_expires_at < now() - unused_age)
                )
              AND NOT EXISTS (
                  SELECT FROM oauth_grants g
                  JOIN user_sessions s ON s.family_id = g.family_id
                  WHERE g.client_id = c.client_id
                    AND s.revoked_at IS NULL
                    AND greatest(s.expires_at, s.refresh_expires_at) > now()
              )
              AND NOT EXISTS (
                  SELECT FROM oauth_pending_authorizations p
                  WHERE p.client_id = c.client_id AND p.expires_at > now()
              )
              AND NOT EXISTS (
                  SELECT FROM oauth_codes k
                  WHERE k.client_id = c.client_id AND k.expires_at > now()
              );
            GET DIAGNOSTICS step = ROW_COUNT;
            deleted := deleted + step;

            RETURN deleted;
        END
        $function$;
    END IF;
END
$migration$;
