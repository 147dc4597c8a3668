"""Synthetic-image provenance: what every medsd PNG says about itself, in its text chunks.

Bulk datasets and the HTTP API write PNGs only through :func:`encode_png`, so every synthetic image
carries ``synthetic=true`` and how it was made (prompt, seed, guidance, steps, sampler, model hash).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

SYNTHETIC_KEY = "synthetic"
SOFTWARE = "medsd"


@dataclass(frozen=True)
class Provenance:
    """How one synthetic image was made."""

    prompt: str
    seed: int
    guidance_scale: float
    steps: int
    sampler: str
    model_hash: str
    negative_prompt: str = ""

    def text_chunks(self) -> dict[str, str]:
        """PNG tEXt/iTXt entries: ``synthetic=true`` first, then every field as text."""
        chunks = {SYNTHETIC_KEY: "true", "Software": SOFTWARE}
        chunks.update({name: str(value) for name, value in asdict(self).items()})
        return chunks


def encode_png(image: np.ndarray, provenance: Provenance) -> bytes:
    """(H, W) uint8 grayscale -> single-channel PNG bytes carrying ``provenance``."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image: expected a (H, W) uint8 array, got {image.dtype} of shape {image.shape}")
    info = PngImagePlugin.PngInfo()
    for key, value in provenance.text_chunks().items():
        # iTXt keeps non-Latin-1 prompts intact; tEXt would refuse them.
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_provenance(source: bytes | str | Path) -> Provenance:
    """The provenance a medsd PNG carries; ValueError when the PNG is not marked synthetic by medsd."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    text = dict(getattr(image, "text", {}))
    name = "PNG bytes" if isinstance(source, bytes) else str(source)
    if text.get(SYNTHETIC_KEY) != "true":
        raise ValueError(f"{name}: no '{SYNTHETIC_KEY}=true' text chunk; not a medsd synthetic image")
    missing = [f.name for f in fields(Provenance) if f.name not in text]
    if missing:
        raise ValueError(f"{name}: provenance text chunks missing {missing}")
    return Provenance(
        prompt=text["prompt"],
        seed=int(text["seed"]),
        guidance_scale=float(text["guidance_scale"]),
        steps=int(text["steps"]),
        sampler=text["sampler"],
        model_hash=text["model_hash"],
        negative_prompt=text["negative_prompt"],
    )
