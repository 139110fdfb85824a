-- Deleting expired sessions, by the database clock.
--
-- cleanup_expired_sessions() deletes every session whose expires_at is
-- earlier than now() in one statement and returns how many it deleted.
-- cleanup_expired_sessions_batch(n) deletes at most n of them, oldest first,
-- through idx_user_sessions_expires, and skips rows that another transaction
-- has locked. CALL cleanup_expired_sessions_in_batches(n) repeats it, with a
-- COMMIT after each batch, until nothing is left; it must be called outside
-- an explicit transaction block.
--
-- Idempotent: each function is created only when missing, so running this
-- file again changes nothing and never undoes a later migration.

DO $migration$
BEGIN
    IF to_regprocedure('cleanup_expired_sessions()') IS NULL THEN
        CREATE FUNCTION cleanup_expired_sessions() RETURNS bigint
            LANGUAGE plpgsql
            AS $function$
        DECLARE
            deleted bigint;
        BEGIN
            DELETE FROM user_sessions WHERE expires_at < now();
            GET DIAGNOSTICS deleted = ROW_COUNT;
            RETURN deleted;
        END
        $function$;
    END IF;

    IF to_regprocedure('cleanup_expired_sessions_batch(integer)') IS NULL THEN
        CREATE FUNCTION cleanup_expired_sessions_batch(batch_size integer)
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
            -- scan of exactly the locked rows. "id IN (subquery)" lets the
            -- planner pick a hash join over a sequential scan of the whole
            -- table for batches of a few thousand rows. The addresses stay
            -- valid because this transaction holds the rows' locks.
            DELETE FROM user_sessions
            WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM user_sessions
                WHERE expires_at < now()
                ORDER BY expires_at
                LIMIT batch_size
                FOR UPDATE SKIP LOCKED
            ));
            GET DIAGNOSTICS deleted = ROW_COUNT;
            RETURN deleted;
        END
        $function$;
    END IF;

    IF to_regprocedure('cleanup_expired_sessions_in_batches(integer,bigint)') IS NULL
    THEN
        CREATE PROCEDURE cleanup_expired_sessions_in_batches(
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
                batch_deleted := cleanup_expired_sessions_batch(batch_size);
                deleted := deleted + batch_deleted;
                COMMIT;
                EXIT WHEN batch_deleted < batch_size;
            END LOOP;
        END
        $function$;
    END IF;
END
$migration$;
