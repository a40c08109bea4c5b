"""Upload validation with real image bytes and bad bytes."""
import io

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from tests.conftest import image_bytes
from webchat.extensions import db
from webchat.models import Image, User


def upload(client, field="avatar", data=b"", filename="a.png"):
    return client.post("/profile", data={"name": "Alice", "remark": "", field: (io.BytesIO(data), filename)},
                       content_type="multipart/form-data")


def image_count(app):
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Image))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_avatar_upload_is_reencoded(app, client, users, auth, fmt):
    auth.login()
    response = upload(client, data=image_bytes(fmt), filename=f"a.{fmt.lower()}")
    assert response.status_code == 303
    with app.app_context():
        user = db.session.get(User, users["alice"])
        image = db.session.get(Image, user.avatar_id)
        assert image.content_type == "image/webp"
        assert PILImage.open(io.BytesIO(image.data)).format == "WEBP"
    served = client.get(f"/images/{user.avatar_id}/thumb")
    assert served.status_code == 200 and served.mimetype == "image/webp"
    assert "immutable" in served.headers["Cache-Control"]


def test_metadata_is_stripped(app, client, users, auth):
    img = PILImage.new("RGB", (40, 30), (1, 2, 3))
    exif = PILImage.Exif()
    exif[0x010F] = "SecretCam"  # Make
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert b"SecretCam" in buf.getvalue()
    auth.login()
    assert upload(client, data=buf.getvalue(), filename="a.jpg").status_code == 303
    with app.app_context():
        image = db.session.get(Image, db.session.get(User, users["alice"]).avatar_id)
        assert b"SecretCam" not in image.data


def test_background_upload(app, client, users, auth):
    auth.login()
    assert upload(client, field="background", data=image_bytes("PNG")).status_code == 303
    with app.app_context():
        assert db.session.get(User, users["alice"]).background_id is not None


@pytest.mark.parametrize("data, filename", [
    (b"not an image at all", "x.png"),
    (b"%PDF-1.4 fake", "x.pdf"),
    (image_bytes("PNG")[:60], "truncated.png"),
    (b"GIF89a" + b"\x00" * 20, "fake.gif"),
])
def test_non_images_are_refused_and_nothing_stored(app, client, users, auth, data, filename):
    auth.login()
    response = upload(client, data=data, filename=filename)
    assert response.status_code == 400
    assert "not a PNG, JPEG, GIF or WebP" in response.get_data(as_text=True)
    assert image_count(app) == 0


def test_unsupported_format_is_refused(app, client, users, auth):
    buf = io.BytesIO()
    PILImage.new("RGB", (10, 10)).save(buf, format="BMP")
    auth.login()
    assert upload(client, data=buf.getvalue(), filename="x.bmp").status_code == 400
    assert image_count(app) == 0


def test_oversized_upload_is_refused(app, client, users, auth):
    auth.login()
    big = image_bytes("PNG") + b"\x00" * (5 * 1024 * 1024)
    response = upload(client, data=big)
    assert response.status_code == 413
    assert image_count(app) == 0


def test_decompression_bomb_is_refused(app, client, users, auth):
    # A tiny PNG that claims 20000 x 20000 pixels.
    buf = io.BytesIO()
    PILImage.new("1", (20000, 20000)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 5 * 1024 * 1024
    auth.login()
    response = upload(client, data=buf.getvalue())
    assert response.status_code == 413
    assert "too many pixels" in response.get_data(as_text=True)
    assert image_count(app) == 0


def test_request_over_the_body_limit_is_a_clear_413(client, users, auth):
    auth.login()
    response = upload(client, data=b"\x00" * (13 * 1024 * 1024))
    assert response.status_code == 413
