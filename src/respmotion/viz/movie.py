"""Write frame sequences as GIF (Pillow) or MP4 (imageio's ffmpeg plugin, when installed), atomically."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.atomic import atomic_path

log = logging.getLogger("respmotion")


def write_gif(path: str | os.PathLike, frames: list[np.ndarray], fps: float) -> Path:
    """Looping GIF, one frame per entry of ``frames`` (RGB ``uint8`` ``(H, W, 3)``, all the same size)."""
    path = Path(path)
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"{path}: frames differ in size: {sorted(sizes)}")
    images = [Image.fromarray(np.ascontiguousarray(f, dtype=np.uint8), "RGB") for f in frames]
    duration_ms = int(round(1000.0 / fps))
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


def ffmpeg_available() -> bool:
    """True when imageio can write MP4 (the ``imageio-ffmpeg`` package is importable)."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


MP4_UNAVAILABLE = "MP4 not written: imageio's ffmpeg plugin is not installed (pip install imageio-ffmpeg); the GIFs are complete"


def write_mp4(path: str | os.PathLike, frames: list[np.ndarray], fps: float) -> Path | None:
    """H.264 MP4 of ``frames``; returns ``None`` (after logging :data:`MP4_UNAVAILABLE`) without ffmpeg."""
    if not ffmpeg_available():
        log.warning(MP4_UNAVAILABLE)
        return None
    import imageio.v2 as imageio

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(str(tmp), format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    macro_block_size=16, pixelformat="yuv420p")
        try:
            for f in frames:
                writer.append_data(f)
        finally:
            writer.close()
    return path
