"""Finding people: the user search behind the sidebar and the group form."""
import pytest

from tests.conftest import make_user
from webchat.extensions import db
from webchat.models import User
from webchat.services import people


@pytest.fixture
def finder(app, ctx):
    me = make_user("me")
    return me.id


def test_search_matches_usernames_and_nicknames_whatever_the_case(finder):
    make_user("alice", name="Wonderland")
    make_user("bob", name="ALICE fan")
    assert [u.username for u in people.search_users("aLiCe", finder)] == ["alice", "bob"]
    assert [u.username for u in people.search_users("wonder", finder)] == ["alice"]


def test_search_leaves_out_disabled_users_and_oneself(finder):
    make_user("carol")
    gone = make_user("caroline")
    gone.is_disabled = True
    db.session.commit()
    assert [u.username for u in people.search_users("carol", finder)] == ["carol"]
    assert people.search_users("me", finder) == []


@pytest.mark.parametrize("query, expected", [("%", ["per%cent"]), ("_", ["under_score"]), ("\\", ["back\\slash"])])
def test_like_wildcards_in_a_query_match_only_themselves(finder, query, expected):
    make_user("percent", name="per%cent")
    make_user("underscore", name="under_score")
    make_user("backslash", name="back\\slash")
    make_user("plain", name="plain name")
    assert [u.name for u in people.search_users(query, finder)] == expected


def test_search_returns_at_most_the_limit_in_username_order(finder):
    for i in range(25):
        make_user(f"user{i:02d}")
    found = people.search_users("user", finder)
    assert len(found) == 20
    assert [u.username for u in found] == sorted(u.username for u in found)


def test_an_empty_query_finds_nobody(finder):
    make_user("alice")
    assert people.search_users("   ", finder) == []
    assert db.session.query(User).count() == 2
