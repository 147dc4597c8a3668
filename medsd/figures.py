"""Figures written as PNG files: labelled image grids (and, later, plots)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TITLE_WIDTH_PX = 170  # room for the longest CheXpert name at the default font
CELL_GAP_PX = 2


def save_image_grid(
    images: np.ndarray,
    row_titles: Sequence[str],
    out_path: str | Path,
    *,
    column_titles: Sequence[str] | None = None,
    min_cell_px: int = 96,
) -> Path:
    """Write a (rows, columns, H, W) uint8 array as one PNG with a title per row (and column).

    Small images are enlarged (nearest neighbour, so no detail is invented) to ``min_cell_px``.
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected shape (rows, columns, H, W), got {images.shape}")
    rows, columns, height, width = images.shape
    if len(row_titles) != rows:
        raise ValueError(f"row_titles: got {len(row_titles)} titles for {rows} rows")
    if column_titles is not None and len(column_titles) != columns:
        raise ValueError(f"column_titles: got {len(column_titles)} titles for {columns} columns")
    scale = max(1, -(-min_cell_px // max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    header_px = 16 if column_titles is not None else 0
    canvas = Image.new(
        "L",
        (TITLE_WIDTH_PX + columns * (cell_w + CELL_GAP_PX), header_px + rows * (cell_h + CELL_GAP_PX)),
        color=255,
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for column, title in enumerate(column_titles or []):
        draw.text((TITLE_WIDTH_PX + column * (cell_w + CELL_GAP_PX) + 2, 2), title, fill=0, font=font)
    for row, title in enumerate(row_titles):
        top = header_px + row * (cell_h + CELL_GAP_PX)
        draw.text((4, top + cell_h // 2 - 6), title, fill=0, font=font)
        for column in range(columns):
            cell = Image.fromarray(images[row, column]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(cell, (TITLE_WIDTH_PX + column * (cell_w + CELL_GAP_PX), top))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path
