from conftest import ScratchDatabase


def test_migrated_clone_has_tables(db: ScratchDatabase) -> None:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM user_sessions").fetchone()
    assert row == (0,)
