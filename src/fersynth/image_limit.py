"""The largest image, in pixels, that any stage decodes (settings: `max_image_pixels`).

Pillow's own guard (`Image.MAX_IMAGE_PIXELS`) holds the limit, so that every decode in the
process uses one value; `fersynth.dataset.decode_image` turns Pillow's warning and error into
a rejection that names the image and its size. Worker processes forked after the settings are
loaded inherit it.
"""

from __future__ import annotations

from PIL import Image

# Pillow's default limit (about 9459 x 9459): far above any face image, far below a bomb.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def set_max_image_pixels(limit: int) -> None:
    """Refuse images of more than `limit` pixels (width x height) from now on, in this process."""
    Image.MAX_IMAGE_PIXELS = int(limit)


def max_image_pixels() -> int:
    return int(Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_IMAGE_PIXELS)


set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
