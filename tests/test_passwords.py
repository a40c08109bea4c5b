"""Secrets chosen and kept: the password rules (not the username, not a common one, 8 to 128
characters) wherever a person picks one, and the SQLite database file created private."""
import os
import stat

import pytest
import sqlalchemy as sa

from webchat.embedded import sqlite_url
from webchat.services import DomainError
from webchat.services.accounts import COMMON_PASSWORDS, check_new_password


def register(client, username, password):
    return client.post("/auth/register", data={"username": username, "password": password})


@pytest.mark.parametrize("username, password, message", [
    ("alice", "password123", "one of the most common"),
    ("alice", "PassWord123", "one of the most common"),  # whatever the case
    ("alice", "qwertyuiop", "one of the most common"),
    ("alice", "alice123", "must not contain the username"),
    ("alice", "123ALICE456", "must not contain the username"),
    ("alice", "alice", "8 to 128"),  # too short first
    ("alice", "x" * 129, "8 to 128"),
])
def test_registration_refuses_weak_passwords(client, username, password, message):
    response = register(client, username, password)
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)
    assert client.get("/").status_code in (302, 303)  # no account, nobody signed in


@pytest.mark.parametrize("password", ["correct-horse-battery", "x" * 120 + "-Zq7!wp9", "Ünïcödé-pässwörd"])
def test_registration_accepts_a_fine_password(client, password):
    assert register(client, "alice", password).status_code == 303


def test_the_common_list_is_a_maintained_one():
    assert len(COMMON_PASSWORDS) >= 10_000
    assert {"password", "123456789", "iloveyou", "password123", "trustno1"} <= COMMON_PASSWORDS


def test_the_rules_are_one_function_for_every_caller():
    with pytest.raises(DomainError) as info:
        check_new_password("bob-the-builder", "Bob")
    assert info.value.status == 422
    assert check_new_password("correct-horse-battery", "bob") == "correct-horse-battery"


def test_the_sqlite_file_is_created_readable_by_its_owner_only(tmp_path):
    url = sqlite_url(str(tmp_path / "instance"))
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # SQLite creates what is missing, with the umask's mode (0644)
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    engine.dispose()
    path = url[len("sqlite:///"):]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o640)  # an existing file is the deployer's: left as it is
    sqlite_url(str(tmp_path / "instance"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
