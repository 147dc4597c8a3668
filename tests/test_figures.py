import numpy as np
import pytest
from PIL import Image

from medsd.figures import save_image_grid


def test_grid_places_each_image_in_its_cell(tmp_path):
    images = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    images[1, 2] = 200  # one bright cell: row 1, column 2
    path = save_image_grid(images, ["first", "second"], tmp_path / "grid.png", min_cell_px=16)
    grid = np.asarray(Image.open(path))
    # 2x enlargement: cells 16 px, 2 px gaps, 170 px title column, no header.
    assert grid.shape == (2 * 18, 170 + 3 * 18)
    bright = np.argwhere(grid[:, 170:] == 200) + [0, 170]  # the title column holds grey text pixels
    assert bright[:, 0].min() == 18 and bright[:, 0].max() == 33
    assert bright[:, 1].min() == 170 + 2 * 18 and bright[:, 1].max() == 170 + 2 * 18 + 15


def test_grid_rejects_mismatched_titles(tmp_path):
    with pytest.raises(ValueError, match="row_titles: got 1 titles for 2 rows"):
        save_image_grid(np.zeros((2, 1, 4, 4), np.uint8), ["only one"], tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"expected shape \(rows, columns, H, W\)"):
        save_image_grid(np.zeros((2, 4, 4), np.uint8), ["a", "b"], tmp_path / "g.png")
