"""Validate uploads by their content and re-encode them with Pillow."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from flask import current_app
from flask_babel import lazy_gettext as _l
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError
from sqlalchemy import select

from ..extensions import db
from ..models import Image, Membership, new_image_id
from . import ImageRefused, NotFound

ALLOWED_FORMATS = {"PNG", "JPEG", "GIF", "WEBP"}
FULL_SIZE = 2048
THUMB_SIZE = 360


@dataclass
class EncodedImage:
    data: bytes
    thumb: bytes
    width: int
    height: int


def _read_upload(upload) -> bytes:
    limit = current_app.config["MAX_IMAGE_BYTES"]
    data = upload.read(limit + 1)
    if not data:
        raise ImageRefused(_l("The uploaded file is empty."), 400)
    if len(data) > limit:
        raise ImageRefused(_l("Images may be at most %(mb)d MB.", mb=limit // (1024 * 1024)), 413)
    return data


def encode_image(data: bytes) -> EncodedImage:
    """Check that the bytes are a PNG/JPEG/GIF/WebP image and re-encode them without metadata."""
    max_pixels = current_app.config["MAX_IMAGE_PIXELS"]
    bad = ImageRefused(_l("That file is not a PNG, JPEG, GIF or WebP image."), 400)
    try:
        with warnings.catch_warnings():
            # A decompression bomb must be refused, not merely warned about.
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as probe:
                if probe.format not in ALLOWED_FORMATS:
                    raise bad
                if probe.width * probe.height > max_pixels:
                    raise ImageRefused(_l("That image has too many pixels."), 413)
                probe.verify()
            # verify() leaves the image unusable: open again to decode it.
            with PILImage.open(io.BytesIO(data)) as img:
                img.seek(0)  # first frame of an animation
                img.load()
                img = ImageOps.exif_transpose(img)
                img = img.convert("RGBA" if _has_alpha(img) else "RGB")
    except ImageRefused:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise ImageRefused(_l("That image has too many pixels."), 413)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise bad
    full = img.copy()
    full.thumbnail((FULL_SIZE, FULL_SIZE))
    thumb = img.copy()
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    return EncodedImage(data=_webp(full), thumb=_webp(thumb), width=full.width, height=full.height)


def _has_alpha(img: PILImage.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _webp(img: PILImage.Image) -> bytes:
    out = io.BytesIO()
    # Saving fresh pixels drops EXIF, GPS and any other metadata of the upload.
    img.save(out, format="WEBP", quality=85, method=4)
    return out.getvalue()


def store_upload(upload, *, uploader_id: int | None = None, conversation_id: int | None = None) -> Image:
    """Validate an uploaded file and add it to the session as an Image (not committed)."""
    encoded = encode_image(_read_upload(upload))
    image = Image(
        id=new_image_id(),  # needed before flush: callers store the id on their rows
        uploader_id=uploader_id,
        conversation_id=conversation_id,
        content_type="image/webp",
        data=encoded.data,
        thumb=encoded.thumb,
        width=encoded.width,
        height=encoded.height,
        size=len(encoded.data) + len(encoded.thumb),
    )
    db.session.add(image)
    return image


@dataclass
class ServedImage:
    id: str
    content_type: str
    body: bytes


def image_for(user_id: int, image_id: str, variant: str = "full") -> ServedImage:
    """Return an image's bytes if this user may see it (members only for conversation images), else 404."""
    if variant not in ("full", "thumb"):
        raise NotFound(_l("No such image."))
    row = db.session.execute(
        select(Image.id, Image.conversation_id, Image.content_type,
               Image.thumb if variant == "thumb" else Image.data).where(Image.id == image_id)
    ).first()
    # The same answer for "no such image" and "not yours": do not reveal that it exists.
    if row is None or row[3] is None:
        raise NotFound(_l("No such image."))
    if row.conversation_id is not None and db.session.get(Membership, (row.conversation_id, user_id)) is None:
        raise NotFound(_l("No such image."))
    return ServedImage(row.id, row.content_type, row[3])


def has_file(upload) -> bool:
    """Say whether a form's file field carries a file."""
    return upload is not None and bool(getattr(upload, "filename", ""))
