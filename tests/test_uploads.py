"""Upload validation with real image bytes and bad bytes, what processing makes of them, and its limits."""
import io
import threading
import time

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from tests.conftest import image_bytes
from webchat.extensions import db
from webchat.models import Image, User
from webchat.services import conversations as convs
from webchat.services import images


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
    assert served.headers["ETag"]  # (how long browsers keep it is the route's business: test_chat_routes)


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


# --- what processing makes of a picture ---------------------------------------------------------

def stored_avatar(app, user_id: int) -> tuple[Image, PILImage.Image, PILImage.Image]:
    """The user's avatar row, with its full picture and thumbnail decoded."""
    with app.app_context():
        image = db.session.get(Image, db.session.get(User, user_id).avatar_id)
        db.session.expunge(image)
    return image, PILImage.open(io.BytesIO(image.data)), PILImage.open(io.BytesIO(image.thumb))


def encoded(img: PILImage.Image, fmt: str, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


def test_a_big_picture_is_shrunk_to_full_size_and_a_thumbnail(app, client, users, auth):
    auth.login()
    assert upload(client, data=image_bytes("PNG", size=(3000, 1500))).status_code == 303
    image, full, thumb = stored_avatar(app, users["alice"])
    assert full.size == (2048, 1024) and (image.width, image.height) == (2048, 1024)
    assert thumb.size == (360, 180)
    assert full.convert("RGB").getpixel((1000, 500)) == pytest.approx((200, 30, 30), abs=6)


def test_a_small_picture_keeps_its_size(app, client, users, auth):
    auth.login()
    assert upload(client, data=image_bytes("PNG", size=(64, 48))).status_code == 303
    image, full, thumb = stored_avatar(app, users["alice"])
    assert full.size == thumb.size == (64, 48) == (image.width, image.height)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_transparency_stays_transparent(app, client, users, auth, fmt):
    # Left half transparent, right half opaque red.
    if fmt == "GIF":  # a palette whose entry 0 is transparent
        img = PILImage.new("P", (40, 20), 0)
        img.putpalette([0, 0, 0, 255, 0, 0])
        img.paste(1, (20, 0, 40, 20))
        data = encoded(img, "GIF", transparency=0)
    else:
        img = PILImage.new("RGBA", (40, 20), (0, 0, 0, 0))
        img.paste((255, 0, 0, 255), (20, 0, 40, 20))
        data = encoded(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    auth.login()
    assert upload(client, data=data, filename=f"t.{fmt.lower()}").status_code == 303
    _image, full, thumb = stored_avatar(app, users["alice"])
    for picture in (full, thumb):
        assert picture.mode == "RGBA"
        assert picture.getpixel((2, 10))[3] == 0
        assert picture.getpixel((37, 10))[3] == 255
        assert picture.getpixel((37, 10))[:3] == pytest.approx((255, 0, 0), abs=6)


def test_an_opaque_picture_is_stored_without_alpha(app, client, users, auth):
    auth.login()
    assert upload(client, data=encoded(PILImage.new("RGBA", (30, 20), (10, 200, 30, 255)), "PNG")).status_code == 303
    assert stored_avatar(app, users["alice"])[1].mode == "RGB"  # WebP leaves out an alpha channel with nothing in it
    assert upload(client, data=image_bytes("JPEG")).status_code == 303
    assert stored_avatar(app, users["alice"])[1].mode == "RGB"


@pytest.mark.parametrize("size", [(40, 20), (4000, 2000)])
def test_exif_orientation_is_applied(app, client, users, auth, size):
    # Stored sideways: left half red, right half blue; Orientation 6 says "turn 90 degrees clockwise".
    width, height = size
    img = PILImage.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (width // 2, 0, width, height))
    exif = PILImage.Exif()
    exif[0x0112] = 6
    auth.login()
    assert upload(client, data=encoded(img, "JPEG", exif=exif.tobytes(), quality=95), filename="p.jpg").status_code == 303
    image, full, thumb = stored_avatar(app, users["alice"])
    assert full.height > full.width and thumb.height > thumb.width
    assert (image.width, image.height) == full.size == ((1024, 2048) if width > 2048 else (20, 40))
    for picture in (full.convert("RGB"), thumb.convert("RGB")):
        w, h = picture.size
        assert picture.getpixel((w // 2, h // 4)) == pytest.approx((255, 0, 0), abs=30)  # left went up
        assert picture.getpixel((w // 2, 3 * h // 4)) == pytest.approx((0, 0, 255), abs=30)
    assert b"Exif" not in image.data


def test_an_animated_gif_becomes_a_still_of_its_first_frame(app, client, users, auth):
    frames = [PILImage.new("RGB", (30, 20), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert PILImage.open(io.BytesIO(data)).n_frames == 3
    auth.login()
    assert upload(client, data=data, filename="a.gif").status_code == 303
    _image, full, _thumb = stored_avatar(app, users["alice"])
    assert full.format == "WEBP" and getattr(full, "n_frames", 1) == 1
    assert full.convert("RGB").getpixel((15, 10)) == pytest.approx((255, 0, 0), abs=6)


@pytest.mark.parametrize("field", ["avatar", "background"])
def test_an_empty_file_is_a_clear_400(app, client, users, auth, field):
    auth.login()
    response = upload(client, field=field, data=b"", filename="empty.png")
    assert response.status_code == 400
    assert "The uploaded file is empty." in response.get_data(as_text=True)
    assert image_count(app) == 0


@pytest.mark.parametrize("data, filename", [
    (b"<!doctype html><script>alert(1)</script>", "x.jpg"),
    (b"PK\x03\x04" + b"\x00" * 40, "x.gif"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "x.png"),  # a PNG signature and nothing of a PNG after it
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "x.webp"),
])
def test_a_non_image_with_an_image_name_is_a_clear_400(app, client, users, auth, data, filename):
    auth.login()
    response = upload(client, data=data, filename=filename)
    assert response.status_code == 400
    assert "not a PNG, JPEG, GIF or WebP" in response.get_data(as_text=True)
    assert image_count(app) == 0


def test_a_picture_just_over_the_pixel_limit_is_refused(app, client, users, auth):
    # 6400 x 6400 = 40.96 MP: over webchat's 40 MP limit, under Pillow's own bomb check (89 MP).
    data = encoded(PILImage.new("1", (6400, 6400)), "PNG", optimize=True)
    auth.login()
    response = upload(client, data=data)
    assert response.status_code == 413
    assert "too many pixels" in response.get_data(as_text=True)
    assert image_count(app) == 0


# --- the memory bound and the decode slots -----------------------------------------------------

def estimate(img: PILImage.Image, fmt: str) -> int:
    return images.decode_bytes(images._open(encoded(img, fmt)))


def test_decode_memory_is_estimated_from_the_header():
    small = 2048 * 2048 * 4  # the shrunk picture
    assert estimate(PILImage.new("RGBA", (1000, 500)), "PNG") == 1000 * 500 * 8 + small
    assert estimate(PILImage.new("RGB", (1000, 500)), "PNG") == 1000 * 500 * 4 + small
    assert estimate(PILImage.new("L", (1000, 500)), "PNG") == 1000 * 500 * 5 + small
    transparent = PILImage.new("P", (1000, 500))
    transparent.putpalette([0, 0, 0, 255, 0, 0])
    assert estimate(transparent, "GIF") == 1000 * 500 * 5 + small
    transparent.info["transparency"] = 0
    assert estimate(transparent, "GIF") == 1000 * 500 * 8 + small  # it becomes RGBA
    # A big JPEG is decoded at a reduced scale: 4100 x 4100 at 1/2.
    assert estimate(PILImage.new("RGB", (4100, 4100)), "JPEG") == 2050 * 2050 * 4 + small


def test_an_image_over_the_decode_budget_is_refused_before_decoding(app, client, users, auth, monkeypatch):
    decoded = []
    monkeypatch.setattr(images, "decode_and_encode", lambda data: decoded.append(1))
    monkeypatch.setitem(app.config, "MAX_IMAGE_DECODE_BYTES", 2048 * 2048 * 4 + 999 * 1000 * 8)
    auth.login()
    response = upload(client, data=encoded(PILImage.new("RGBA", (1000, 1000)), "PNG"))
    assert response.status_code == 413
    assert "too large to process" in response.get_data(as_text=True)
    assert decoded == [] and image_count(app) == 0


def test_an_image_within_the_decode_budget_goes_through(app, client, users, auth, monkeypatch):
    monkeypatch.setitem(app.config, "MAX_IMAGE_DECODE_BYTES", 2048 * 2048 * 4 + 1000 * 1000 * 8)
    auth.login()
    assert upload(client, data=encoded(PILImage.new("RGBA", (1000, 1000)), "PNG")).status_code == 303


def test_the_default_budget_takes_the_biggest_picture_the_pixel_limit_allows(app):
    assert app.config["MAX_IMAGE_PIXELS"] * 8 + 2048 * 2048 * 4 <= images.DEFAULT_DECODE_BYTES


@pytest.fixture
def one_decode_slot(app, monkeypatch):
    """One decode at a time in this process, its slot taken by the test; returns the gate."""
    monkeypatch.setitem(app.config, "MAX_CONCURRENT_IMAGE_DECODES", 1)
    gate = images.decode_gate(1)
    assert gate.slots.acquire(blocking=False)
    return gate


def test_an_upload_waits_for_a_decode_slot(app, client, users, auth, one_decode_slot, monkeypatch):
    monkeypatch.setitem(app.config, "IMAGE_DECODE_WAIT", 10)
    auth.login()
    threading.Timer(0.5, one_decode_slot.slots.release).start()
    started = time.monotonic()
    assert upload(client, data=image_bytes("PNG")).status_code == 303
    assert time.monotonic() - started >= 0.45
    assert image_count(app) == 1


def test_an_upload_that_finds_no_slot_in_time_is_told_to_try_again(app, client, users, auth, one_decode_slot,
                                                                    monkeypatch):
    monkeypatch.setitem(app.config, "IMAGE_DECODE_WAIT", 0.2)
    auth.login()
    try:
        response = upload(client, data=image_bytes("PNG"))
    finally:
        one_decode_slot.slots.release()
    assert response.status_code == 503
    assert "busy processing other images" in response.get_data(as_text=True)
    assert image_count(app) == 0
    assert upload(client, data=image_bytes("PNG")).status_code == 303  # the slot is back


def test_a_busy_refusal_keeps_the_attachment_on_the_chat_page(app, client, users, auth, one_decode_slot,
                                                               monkeypatch):
    with app.app_context():
        cid = convs.find_or_create_direct(db.session.get(User, users["alice"]), db.session.get(User, users["bob"])).id
    monkeypatch.setitem(app.config, "IMAGE_DECODE_WAIT", 0.1)
    auth.login()
    try:
        response = client.post(f"/conversations/{cid}/messages", headers={"HX-Request": "true"},
                               data={"body": "", "image": (io.BytesIO(image_bytes("PNG")), "p.png")},
                               content_type="multipart/form-data")
    finally:
        one_decode_slot.slots.release()
    assert response.status_code == 503
    assert "image-refused" not in response.headers.get("HX-Trigger", "")  # the user sends it again as it is
