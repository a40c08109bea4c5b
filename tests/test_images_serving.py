"""Serving images: a path that cannot name an image is a 404 before the database sees it."""
import pytest

from tests.conftest import make_user
from webchat.services import NotFound
from webchat.services.images import image_for


@pytest.mark.parametrize("path", [
    "/images/%00",  # PostgreSQL refuses a NUL in a text parameter: this was a 500
    "/images/%00/thumb",
    "/images/abc%00def",
    "/images/" + "x" * 33,
    "/images/caf%C3%A9",
    "/images/a.b",
    "/images/%20",
    "/images/abc/other",
])
def test_a_path_that_is_not_an_image_id_is_404(client, users, auth, path):
    auth.login()
    assert client.get(path).status_code == 404


def test_an_unknown_id_of_the_right_shape_is_404(client, users, auth):
    auth.login()
    assert client.get("/images/AbC-_9" + "x" * 18).status_code == 404


@pytest.mark.parametrize("image_id", ["\x00", "a\x00b", "x" * 33, "", "ümlaut", "a/b"])
def test_image_for_refuses_a_malformed_id_without_a_query(ctx, count_queries, image_id):
    alice = make_user("alice")
    with count_queries() as counter, pytest.raises(NotFound):
        image_for(alice.id, image_id)
    assert counter.count == 0
