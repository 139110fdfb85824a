-- Session lifecycle: refresh expiry, token families, rotation, revocation,
-- last use, change notifications, and request log retention.
--
-- cleanup_request_logs_batch(retention, n) deletes at most n request_logs rows
-- older than the retention; CALL cleanup_request_logs_in_batches(retention, n)
-- repeats it with a COMMIT after each batch, outside an explicit transaction.
--
-- A session outlives its access token. expires_at stays the access token's
-- expiry, as the specification defines it, and refresh_expires_at is the
-- refresh token's. A row ends when both have passed: at
-- greatest(expires_at, refresh_expires_at), where greatest() skips NULL, so a
-- row written with only the specification's columns ends at expires_at.
-- The cleanup functions are redefined to delete only rows that have ended.
--
-- Rows with the same family_id descend from one sign-in through refresh-token
-- rotation; a NULL family_id makes the row a family of its own. rotated_at
-- records when the row's refresh token was exchanged, revoked_at when the row
-- was revoked, and last_used_at when its access token was last validated, to
-- within the library's touch interval.
--
-- Changes that must reach the token caches of running processes (revocation,
-- a shorter expiry, a new subscription level or scope, deletion of a live
-- row) send a notification on the channel mcp_authdb_sessions whose payload
-- is the row's user_id; TRUNCATE sends an empty payload, which means every
-- user. PostgreSQL delivers it when the transaction commits.
--
-- Every new column is nullable with no default, so adding it rewrites no
-- rows. The two new indexes on user_sessions are built in this migration's
-- transaction, which blocks writes to the table (not reads) while they build.
--
-- Idempotent: running this file again changes nothing. The cleanup functions
-- are replaced only while they still have the earlier definition, so running
-- this file again never undoes a later migration.

ALTER TABLE user_sessions
    ADD COLUMN IF NOT EXISTS family_id uuid,
    ADD COLUMN IF NOT EXISTS refresh_expires_at timestamp with time zone,
    ADD COLUMN IF NOT EXISTS rotated_at timestamp with time zone,
    ADD COLUMN IF NOT EXISTS revoked_at timestamp with time zone,
    ADD COLUMN IF NOT EXISTS last_used_at timestamp with time zone;

CREATE INDEX IF NOT EXISTS idx_user_sessions_ends
    ON user_sessions ((greatest(expires_at, refresh_expires_at)));

CREATE INDEX IF NOT EXISTS idx_user_sessions_family_id
    ON user_sessions (family_id)
    WHERE family_id IS NOT NULL;

-- Request logs are appended in time order, so a BRIN index finds old rows for
-- retention at a tiny fraction of a B-tree's size and write cost.
CREATE INDEX IF NOT EXISTS idx_request_logs_created_brin
    ON request_logs USING brin (created_at);

DO $migration$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_proc
        WHERE oid = to_regprocedure('cleanup_expired_sessions()')
          AND prosrc LIKE '%refresh_expires_at%'
    ) THEN
        CREATE OR REPLACE FUNCTION cleanup_expired_sessions() RETURNS bigint
            LANGUAGE plpgsql
            AS $function$
        DECLARE
            deleted bigint;
        BEGIN
            DELETE FROM user_sessions
            WHERE greatest(expires_at, refresh_expires_at) < now();
            GET DIAGNOSTICS deleted = ROW_COUNT;
            RETURN deleted;
        END
        $function$;
    END IF;

    IF NOT EXISTS (
        SELECT FROM pg_proc
        WHERE oid = to_regprocedure('cleanup_expired_sessions_batch(integer)')
          AND prosrc LIKE '%refresh_expires_at%'
    ) THEN
        CREATE OR REPLACE FUNCTION cleanup_expired_sessions_batch(batch_size integer)
            RETURNS integer
            LANGUAGE plpgsql
            AS $function$
        DECLARE
            deleted integer;
        BEGIN
            IF batch_size IS NULL OR batch_size < 1 THEN
                RAISE EXCEPTION 'batch_size must be at least 1, got %', batch_size
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;

            -- The row addresses are collected first, so the DELETE is a TID
            -- scan of exactly the locked rows, found through
            -- idx_user_sessions_ends. The addresses stay valid because this
            -- transaction holds the rows' locks.
            DELETE FROM user_sessions
            WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM user_sessions
                WHERE greatest(expires_at, refresh_expires_at) < now()
                ORDER BY greatest(expires_at, refresh_expires_at)
                LIMIT batch_size
                FOR UPDATE SKIP LOCKED
            ));
            GET DIAGNOSTICS deleted = ROW_COUNT;
            RETURN deleted;
        END
        $function$;
    END IF;

    IF to_regprocedure('cleanup_request_logs_batch(interval,integer)') IS NULL THEN
        CREATE FUNCTION cleanup_request_logs_batch(
            retention interval,
            batch_size integer
        )
            RETURNS integer
            LANGUAGE plpgsql
            AS $function$
        DECLARE
            deleted integer;
        BEGIN
            IF retention IS NULL OR retention <= interval '0' THEN
                RAISE EXCEPTION 'retention must be positive, got %', retention
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF batch_size IS NULL OR batch_size < 1 THEN
                RAISE EXCEPTION 'batch_size must be at least 1, got %', batch_size
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;

            DELETE FROM request_logs
            WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM request_logs
                WHERE created_at < now() - retention
                LIMIT batch_size
                FOR UPDATE SKIP LOCKED
            ));
            GET DIAGNOSTICS deleted = ROW_COUNT;
            RETURN deleted;
        END
        $function$;
    END IF;

    IF to_regprocedure('cleanup_request_logs_in_batches(interval,integer,bigint)') IS NULL
    THEN
        CREATE PROCEDURE cleanup_request_logs_in_batches(
            retention interval,
            batch_size integer DEFAULT 5000,
            INOUT deleted bigint DEFAULT 0
        )
            LANGUAGE plpgsql
            AS $function$
        DECLARE
            batch_deleted integer;
        BEGIN
            deleted := 0;
            LOOP
                batch_deleted := cleanup_request_logs_batch(retention, batch_size);
                deleted := deleted + batch_deleted;
                COMMIT;
                EXIT WHEN batch_deleted < batch_size;
            END LOOP;
        END
        $function$;
    END IF;

    IF to_regprocedure('mcp_authdb_notify_session_change()') IS NULL THEN
        CREATE FUNCTION mcp_authdb_notify_session_change() RETURNS trigger
            LANGUAGE plpgsql
            AS $function$
        BEGIN
            PERFORM pg_notify('mcp_authdb_sessions', OLD.user_id);
            IF TG_OP = 'UPDATE' AND NEW.user_id <> OLD.user_id THEN
                PERFORM pg_notify('mcp_authdb_sessions', NEW.user_id);
            END IF;
            RETURN NULL;
        END
        $function$;
    END IF;

    IF NOT EXISTS (
        SELECT FROM pg_trigger
        WHERE tgrelid = 'user_sessions'::regclass
          AND tgname = 'user_sessions_notify_update'
    ) THEN
        CREATE TRIGGER user_sessions_notify_update
            AFTER UPDATE ON user_sessions
            FOR EACH ROW
            WHEN (
                OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
                OR OLD.expires_at > NEW.expires_at
                OR OLD.subscription_level <> NEW.subscription_level
                OR OLD.scope <> NEW.scope
                OR OLD.user_id <> NEW.user_id
                OR OLD.access_token_hash <> NEW.access_token_hash
            )
            EXECUTE FUNCTION mcp_authdb_notify_session_change();
    END IF;

    IF NOT EXISTS (
        SELECT FROM pg_trigger
        WHERE tgrelid = 'user_sessions'::regclass
          AND tgname = 'user_sessions_notify_delete'
    ) THEN
        -- Deleting an expired row needs no notification: caches never serve
        -- an access token past expires_at. This keeps cleanup silent.
        CREATE TRIGGER user_sessions_notify_delete
            AFTER DELETE ON user_sessions
            FOR EACH ROW
            WHEN (OLD.expires_at > now() AND OLD.revoked_at IS NULL)
            EXECUTE FUNCTION mcp_authdb_notify_session_change();
    END IF;
    IF to_regprocedure('mcp_authdb_notify_sessions_truncated()') IS NULL THEN
        CREATE FUNCTION mcp_authdb_notify_sessions_truncated() RETURNS trigger
            LANGUAGE plpgsql
            AS $function$
        BEGIN
            PERFORM pg_notify('mcp_authdb_sessions', '');
            RETURN NULL;
        END
        $function$;
    END IF;

    IF NOT EXISTS (
        SELECT FROM pg_trigger
        WHERE tgrelid = 'user_sessions'::regclass
          AND tgname = 'user_sessions_notify_truncate'
    ) THEN
        -- Row triggers do not fire on TRUNCATE. An empty payload tells every
        -- listener to empty its whole cache.
        CREATE TRIGGER user_sessions_notify_truncate
            AFTER TRUNCATE ON user_sessions
            FOR EACH STATEMENT
            EXECUTE FUNCTION mcp_authdb_notify_sessions_truncated();
    END IF;
END
$migration$;
