"""Show an image in a terminal: two pixel rows per character cell ("▀" with 24-bit foreground and background
colours), so `diffship generate --show` can display its result where no image viewer is at hand."""

from __future__ import annotations

import numpy as np


def terminal_image(image, max_width: int = 64) -> str:
    """ANSI text drawing `image` (PIL image or (H, W, 3) uint8 array), shrunk to at most `max_width` columns."""
    from PIL import Image

    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture = picture.convert("RGB")
    if picture.width > max_width:
        picture = picture.resize((max_width, max(2, round(picture.height * max_width / picture.width))),
                                 Image.BILINEAR)
    pixels = np.asarray(picture)
    if len(pixels) % 2:  # an odd last row gets a white partner
        pixels = np.concatenate([pixels, np.full_like(pixels[:1], 255)])
    lines = []
    for top, bottom in zip(pixels[0::2], pixels[1::2]):
        cells = "".join(f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m▀" for a, b in zip(top, bottom))
        lines.append(cells + "\x1b[0m")
    return "\n".join(lines)
