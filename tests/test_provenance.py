import numpy as np
import pytest
from PIL import Image

from medsd.provenance import Provenance, encode_png, read_provenance

PROVENANCE = Provenance(
    prompt="a frontal PA chest x-ray showing édème",  # non-Latin-1 survives
    seed=7,
    guidance_scale=4.5,
    steps=20,
    sampler="dpm++",
    model_hash="0123456789abcdef",
    negative_prompt="lateral",
)


def test_png_is_single_channel_and_carries_its_provenance(tmp_path):
    image = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    png = encode_png(image, PROVENANCE)
    path = tmp_path / "x.png"
    path.write_bytes(png)
    opened = Image.open(path)
    assert opened.mode == "L"
    np.testing.assert_array_equal(np.asarray(opened), image)
    assert opened.text["synthetic"] == "true"
    assert read_provenance(path) == PROVENANCE
    assert read_provenance(png) == PROVENANCE


def test_same_inputs_same_bytes():
    image = np.full((8, 8), 3, np.uint8)
    assert encode_png(image, PROVENANCE) == encode_png(image.copy(), PROVENANCE)


def test_unmarked_png_and_bad_arrays_are_refused(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    with pytest.raises(ValueError, match="plain.png: no 'synthetic=true'"):
        read_provenance(path)
    with pytest.raises(ValueError, match=r"expected a \(H, W\) uint8 array"):
        encode_png(np.zeros((4, 4, 3), np.uint8), PROVENANCE)
