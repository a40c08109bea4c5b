"""The migration from an empty database: upgrade, then downgrade."""
import uuid

import pytest
import sqlalchemy as sa
from flask_migrate import downgrade, upgrade

from webchat import create_app
from webchat.config import TestConfig


@pytest.fixture
def empty_database_url(app, tmp_path):
    url = app.config["SQLALCHEMY_DATABASE_URI"]
    if url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/migrations.db"
        return
    name = "webchat_mig_" + uuid.uuid4().hex[:8]
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    yield url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def test_upgrade_then_downgrade_from_empty(empty_database_url, monkeypatch):
    config = TestConfig()
    config.SQLALCHEMY_DATABASE_URI = empty_database_url
    app = create_app(config)
    with app.app_context():
        from webchat.extensions import db

        upgrade()
        tables = set(sa.inspect(db.engine).get_table_names())
        assert {"users", "conversations", "memberships", "messages", "unreads", "images"} <= tables
        indexes = {i["name"] for i in sa.inspect(db.engine).get_indexes("messages")}
        assert {"ix_messages_conversation_id_id", "ix_messages_created_at"} <= indexes
        # Case-insensitive uniqueness is enforced by the database itself.
        db.session.execute(sa.text("INSERT INTO users (username, name, password_hash, remark, is_admin, is_disabled,"
                                   " created_at, updated_at) VALUES ('Zed', 'z', 'x', '', false, false,"
                                   " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        with pytest.raises(sa.exc.IntegrityError):
            db.session.execute(sa.text("INSERT INTO users (username, name, password_hash, remark, is_admin,"
                                       " is_disabled, created_at, updated_at) VALUES ('zED', 'z', 'x', '', false,"
                                       " false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        db.session.rollback()
        send_function = sa.text("SELECT count(*) FROM pg_proc WHERE proname = 'webchat_send'")
        if db.engine.dialect.name == "postgresql":
            assert db.session.scalar(send_function) == 1  # 0003: the send in one call
            db.session.rollback()
            downgrade(revision="0002_unread_counters")
            assert db.session.scalar(send_function) == 0
            db.session.rollback()
        downgrade(revision="base")
        left = set(sa.inspect(db.engine).get_table_names()) - {"alembic_version"}
        assert left == set()
        db.engine.dispose()
