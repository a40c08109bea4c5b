"""Validate uploads by their content and re-encode them with Pillow, off the event loop.

A gevent worker runs all of its requests on one OS thread: a 40 MP PNG decoded there stopped
every other request of the process for over a second. So the header is read first, where the
request runs (cheap, and it refuses bombs and oversized decodes before they wait for anything);
the decoding and re-encoding then run in a native thread of gevent's hub pool (Pillow releases
the GIL while it decodes, resizes and encodes), at most MAX_CONCURRENT_IMAGE_DECODES at once in a
process. Without gevent (tests, the dev server, the rq worker) they run in the calling thread,
under the same limit.
"""
from __future__ import annotations

import io
import os
import re
import threading
import warnings
from dataclasses import dataclass

from flask import current_app
from flask_babel import lazy_gettext as _l
from gevent.lock import BoundedSemaphore as CooperativeSemaphore
from gevent.monkey import is_module_patched
from gevent.threadpool import ThreadPool
from PIL import ExifTags, UnidentifiedImageError
from PIL import Image as PILImage
from sqlalchemy import select

from ..extensions import db
from ..models import Image, Membership, new_image_id
from . import DomainError, ImageRefused, NotFound

ALLOWED_FORMATS = {"PNG", "JPEG", "GIF", "WEBP"}
FULL_SIZE = 2048
THUMB_SIZE = 360
# new_image_id() makes 24 characters of URL-safe base64 (the column holds 32). Anything else is
# no image of ours, and must not reach the database: PostgreSQL refuses a NUL in a text parameter.
IMAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")

# Settings that config.py does not define (yet): read with current_app.config.get and these defaults.
# The default decode budget lets MAX_IMAGE_PIXELS decide: 40 MP kept with transparency, the worst
# case, needs 337 MB (decode_bytes). A process holds at most DECODES x BUDGET in decodes: a
# small machine lowers either.
DEFAULT_DECODE_BYTES = 350_000_000
# One decode a process: with a web process a core, that already keeps every core busy; a second
# adds 337 MB at worst and the loop's tail (healthz p99 15-36 ms against 10-13 ms, four 40 MP PNGs).
DEFAULT_CONCURRENT_DECODES = 1
DEFAULT_DECODE_WAIT = 10.0  # seconds an upload waits for a decode slot before "busy, try again"
# How much lower than the event loop's thread a decode thread runs (Linux nice values are per
# thread): on a busy machine the loop still gets a core at once, the decodes get what is left.
DECODE_NICENESS = 10

# Pillow keeps a picture in blocks, 16 MB by default: under glibc's highest mmap threshold
# (32 MB), so once a few have been freed, new ones come from the heap, zeroed while the GIL is
# held (25-35 ms for a 40 MP picture, the event loop stopped meanwhile), and stay in the process
# after. Blocks above it are always fresh mappings: their zero pages arrive as the decoder writes
# them, outside the GIL, and a freed picture goes back to the system. PILLOW_BLOCK_SIZE overrides.
DECODE_BLOCK_BYTES = 256 * 1024 * 1024
if not os.environ.get("PILLOW_BLOCK_SIZE"):
    PILImage.core.set_block_size(DECODE_BLOCK_BYTES)

# EXIF Orientation -> the transposition that shows the picture upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: PILImage.Transpose.FLIP_LEFT_RIGHT,
    3: PILImage.Transpose.ROTATE_180,
    4: PILImage.Transpose.FLIP_TOP_BOTTOM,
    5: PILImage.Transpose.TRANSPOSE,
    6: PILImage.Transpose.ROTATE_270,
    7: PILImage.Transpose.TRANSVERSE,
    8: PILImage.Transpose.ROTATE_90,
}


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


def _not_an_image() -> ImageRefused:
    return ImageRefused(_l("That file is not a PNG, JPEG, GIF or WebP image."), 400)


def _too_many_pixels() -> ImageRefused:
    return ImageRefused(_l("That image has too many pixels."), 413)


def encode_image(data: bytes) -> EncodedImage:
    """Check that the bytes are a PNG/JPEG/GIF/WebP image and re-encode them without metadata.

    The header is checked in the caller; the decoding waits for a decode slot and runs off the
    event loop.
    """
    config = current_app.config
    check_header(data, config["MAX_IMAGE_PIXELS"], config.get("MAX_IMAGE_DECODE_BYTES", DEFAULT_DECODE_BYTES))
    gate = decode_gate(config.get("MAX_CONCURRENT_IMAGE_DECODES", DEFAULT_CONCURRENT_DECODES))
    return gate.run(decode_and_encode, data, wait=config.get("IMAGE_DECODE_WAIT", DEFAULT_DECODE_WAIT))


def check_header(data: bytes, max_pixels: int, max_decode_bytes: int) -> None:
    """Refuse bytes whose header is not an allowed image, or one too big to decode, before decoding."""
    try:
        with warnings.catch_warnings():
            # A decompression bomb must be refused, not merely warned about. (Only here: the
            # warnings filters are process-wide, and this runs where the request does, without
            # yielding; decode threads never see an image this check let through that big.)
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            probe = _open(data)
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise _too_many_pixels()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise _not_an_image()
    if probe.format not in ALLOWED_FORMATS:
        raise _not_an_image()
    if probe.width * probe.height > max_pixels:
        raise _too_many_pixels()
    if decode_bytes(probe) > max_decode_bytes:
        raise ImageRefused(_l("That image is too large to process."), 413)


def _open(data: bytes) -> PILImage.Image:
    """Open the bytes (the header only) as they will be decoded: a big JPEG at a reduced scale."""
    img = PILImage.open(io.BytesIO(data))
    if img.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale for almost nothing: a 48 MP photo needs
        # 48 MB instead of 192 MB and a fraction of the time. Still at least FULL_SIZE a side.
        img.draft(None, (FULL_SIZE, FULL_SIZE))
    return img


def _pixel_bytes(mode: str) -> int:
    """Bytes a pixel of this mode takes in Pillow's memory (several bands are stored 4 bytes wide)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_bytes(img: PILImage.Image) -> int:
    """Estimate, from the header, the memory that decoding and shrinking this image holds at its peak.

    The decoded frame; the RGB(A) copy when its mode needs converting; for a picture kept with
    transparency, the premultiplied copy Pillow resizes RGBA through (8 bytes a pixel in all);
    and the shrunk picture. Measured peaks (16-bit RGBA, RGB, L and LA PNGs of 6300 x 6300, a
    JPEG of 8000 x 5000) stay under it: RSS grew 322, 163, 164, 322 and 7 MB for 334, 176, 215,
    334 and 57 MB estimated.
    """
    pixels = img.width * img.height
    if _has_alpha(img):
        frame = pixels * 8
    else:
        frame = pixels * (_pixel_bytes(img.mode) + (0 if img.mode == "RGB" else 4))
    return frame + FULL_SIZE * FULL_SIZE * 4


def decode_and_encode(data: bytes) -> EncodedImage:
    """Decode checked bytes, shrink them to FULL_SIZE and THUMB_SIZE, and encode both as WebP.

    Runs in a decode thread: no Flask context here, and nothing that waits on gevent.
    The order keeps memory low: convert only when the mode needs it, shrink, and only then turn
    the small picture upright (a transposition copies the whole image).
    """
    try:
        with _open(data) as probe:
            probe.verify()  # checksums and structure; it leaves the image unusable
        img = _open(data)  # the first frame of an animation
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGBA" if _has_alpha(img) else "RGB")
    except PILImage.DecompressionBombError:
        raise _too_many_pixels()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise _not_an_image()
    full = img
    full.thumbnail((FULL_SIZE, FULL_SIZE))  # in place: the decoded frame is freed once shrunk
    if orientation in _UPRIGHT:
        full = full.transpose(_UPRIGHT[orientation])
    thumb = full.copy()
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    return EncodedImage(data=_webp(full), thumb=_webp(thumb), width=full.width, height=full.height)


def _has_alpha(img: PILImage.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _webp(img: PILImage.Image) -> bytes:
    out = io.BytesIO()
    # Saving fresh pixels drops EXIF, GPS and any other metadata of the upload.
    img.save(out, format="WEBP", quality=85, method=4)
    return out.getvalue()


class DecodeGate:
    """At most `limit` decodes at once in this process; the others wait their turn, up to a time.

    Under gevent a decode runs in a native thread of a gevent.threadpool.ThreadPool, made for
    blocking work: the result wakes the waiting greenlet through the hub. The pool is the gate's
    own, not the hub's (which also resolves host names), so that the lower priority its threads
    take stays theirs. concurrent.futures would not do: once threading is monkey-patched its
    "threads" are greenlets on the loop's own OS thread, and its futures' locks are gevent's.
    Without gevent the decode runs in the calling thread, behind a threading semaphore.
    """

    def __init__(self, limit: int, cooperative: bool) -> None:
        self.limit = limit
        self.cooperative = cooperative
        self.slots = CooperativeSemaphore(limit) if cooperative else threading.BoundedSemaphore(limit)
        self.pool = ThreadPool(limit) if cooperative else None
        self.niceness = _niceness_of(0) + DECODE_NICENESS  # relative to the thread that made the gate

    def run(self, func, *args, wait: float):
        """Return func(*args) run in a decode slot; DomainError 503 when none frees up within `wait` s."""
        if not self.slots.acquire(timeout=wait):
            raise DomainError(_l("The server is busy processing other images. Try again in a moment."), 503)
        if not self.cooperative:
            try:
                return func(*args)
            finally:
                self.slots.release()
        try:
            result = self.pool.spawn(_at_priority, self.niceness, func, *args)
        except BaseException:
            self.slots.release()
            raise
        # The slot is freed when the thread is done, even if this greenlet is killed meanwhile:
        # the thread goes on decoding, and still counts.
        result.rawlink(lambda _result: self.slots.release())
        return result.get()


def _niceness_of(thread_id: int) -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, thread_id)
    except (AttributeError, OSError):  # not a Unix
        return 0


def _at_priority(niceness: int, func, *args):
    """Run func(*args) in this pool thread, first lowered to `niceness` (never raised: that needs privileges)."""
    thread_id = threading.get_native_id()  # the OS thread's id, monkey-patched or not
    if _niceness_of(thread_id) < niceness:
        try:
            os.setpriority(os.PRIO_PROCESS, thread_id, min(niceness, 19))
        except (AttributeError, OSError):
            pass
    return func(*args)


_gate_lock = threading.Lock()
_gate: tuple[tuple, DecodeGate] | None = None


def decode_gate(limit: int) -> DecodeGate:
    """Return this process's decode gate (made again after a fork, or when the limit changes)."""
    global _gate
    key = (os.getpid(), int(limit), is_module_patched("threading"))
    with _gate_lock:
        if _gate is None or _gate[0] != key:
            _gate = (key, DecodeGate(key[1], key[2]))
        return _gate[1]


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
    if variant not in ("full", "thumb") or not IMAGE_ID.fullmatch(image_id or ""):
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
