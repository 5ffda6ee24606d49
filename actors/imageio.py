"""Image bytes <-> PIL <-> tensors, in one place for the converter, the pools and the API.

Decoding is defensive: pictures arrive from clients and from data releases, so oversized
dimensions (decompression bombs) and undecodable bytes raise ``ImageError`` with a reason.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """The bytes are not a usable picture; the message says why."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes (PNG, JPEG, ...) -> RGB PIL image, checking size before pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # read from the header; nothing decoded yet
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h}, more than {max_pixels} pixels")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image rejected as a decompression bomb: {e}") from e
    except Exception as e:  # PIL raises many types for bad bytes
        raise ImageError(f"not a decodable image ({type(e).__name__})") from e
    return img.convert("RGB")


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to size x size."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_tensor(images: list[Image.Image]):
    """RGB PIL images of one size -> float tensor (B, 3, H, W) in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
