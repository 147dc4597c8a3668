"""medsd.data on real files written in tmp_path: CheXpert-format CSV rows, PNG/JPEG images, a local Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from PIL import Image

from medsd.config import DataConfig
from medsd.data import (
    BAD_LABEL,
    MALFORMED_ROW,
    MISSING_IMAGE,
    UNDECODABLE_IMAGE,
    ImageRoot,
    LabelledImageDataset,
    UndecodableImageError,
    collate_skipping_bad,
    inspect_dataset,
    load_dataset,
    load_image,
    read_labels_csv,
    resolve_image_root,
    select_rows,
)
from medsd.labels import CHEXPERT, LabelSchema

HEADER = ",".join(CHEXPERT.columns)
# Rows as CheXpert's train.csv writes them: 1.0 / 0.0 / -1.0, blanks, AP/PA blank on laterals.
ROWS = [
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
    "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,",
    "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,PA,,,,,,1.0,,,,0.0,1.0,,,",
]
EYE = LabelSchema("eye", ("RG", "NRG"))
SIZE_PX = 16


def write_gray(path: Path, size: tuple[int, int] = (40, 32), value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def write_chexpert(parent: Path, rows: list[str] = ROWS, header: str = HEADER, images: bool = True) -> Path:
    """CheXpert layout under ``parent``: CheXpert-v1.0-small/train.csv + one image per row's Path."""
    csv_path = parent / "CheXpert-v1.0-small" / "train.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text("\n".join([header, *rows]) + "\n")
    for path in {row.split(",")[0] for row in rows} if images else ():
        if path:
            write_gray(parent / path)
    return csv_path


def row_with(row: str, column: str, value: str) -> str:
    fields = row.split(",")
    fields[CHEXPERT.columns.index(column)] = value
    return ",".join(fields)


def data_config(csv_path: Path, **overrides: object) -> DataConfig:
    return DataConfig(csv=str(csv_path), image_size_px=SIZE_PX, **overrides)


# ---- parsing -------------------------------------------------------------------------------


def test_rows_parse_exactly(tmp_path: Path) -> None:
    assert all(len(row.split(",")) == len(CHEXPERT.columns) for row in ROWS)
    frame, report = read_labels_csv(write_chexpert(tmp_path))
    assert not report.has_problems
    assert list(frame.columns) == [*CHEXPERT.columns, "csv_row"]
    assert frame["csv_row"].tolist() == [2, 3, 4, 5]  # the header is row 1
    first = frame.iloc[0]
    assert first["Path"] == ROWS[0].split(",")[0]
    assert (first["Sex"], first["Age"], first["Frontal/Lateral"], first["AP/PA"]) == ("Female", 68, "Frontal", "AP")
    assert (first["No Finding"], first["Pneumothorax"], first["Support Devices"]) == (1.0, 0.0, 1.0)
    assert np.isnan(first["Edema"])
    assert frame["Cardiomegaly"].tolist()[1] == -1.0
    assert pd.isna(frame["AP/PA"].iloc[2])  # lateral
    assert all(frame[o].dtype == np.float32 for o in CHEXPERT.observations)


def test_blank_lines_are_not_rows_but_keep_row_numbers(tmp_path: Path) -> None:
    rows = [ROWS[0], "", row_with(ROWS[1], "Edema", "2.0")]
    with pytest.raises(ValueError, match='train.csv row 4, column "Edema": got 2.0'):
        read_labels_csv(write_chexpert(tmp_path, rows))


# ---- image root ----------------------------------------------------------------------------


def test_root_may_be_dataset_folder_or_its_parent(tmp_path: Path) -> None:
    csv_path = write_chexpert(tmp_path)
    as_default = load_dataset(data_config(csv_path))  # the CSV's folder: the dataset folder itself
    as_dataset = load_dataset(data_config(csv_path, root=str(csv_path.parent)))
    as_parent = load_dataset(data_config(csv_path, root=str(tmp_path)))
    assert as_default.root.strips_first_folder and as_dataset.root.strips_first_folder
    assert not as_parent.root.strips_first_folder
    expected = [str(tmp_path / row.split(",")[0]) for row in ROWS]
    for images in (as_default, as_dataset, as_parent):
        assert images.frame["image_path"].tolist() == expected


def test_renamed_dataset_folder_still_resolves(tmp_path: Path) -> None:
    csv_path = write_chexpert(tmp_path)
    renamed = tmp_path / "chexpert-small"
    csv_path.parent.rename(renamed)
    images = load_dataset(data_config(renamed / "train.csv"))
    assert images.frame["image_path"].tolist()[0] == str(renamed / "train/patient00001/study1/view1_frontal.jpg")


def test_resolve_image_root_without_files_uses_folder_name(tmp_path: Path) -> None:
    paths = pd.Series([ROWS[0].split(",")[0]])
    assert resolve_image_root(tmp_path / "x.csv", tmp_path / "CheXpert-v1.0-small", paths).strips_first_folder
    assert not resolve_image_root(tmp_path / "x.csv", tmp_path, paths).strips_first_folder
    absolute = ImageRoot(tmp_path).resolve(pd.Series(["/abs/a.png", "rel/b.png"]))
    assert absolute.tolist() == ["/abs/a.png", str(tmp_path / "rel/b.png")]


# ---- bad input: every problem named, collected and raised once --------------------------------


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("Edema", "2.0", r'train.csv row 3, column "Edema": got 2.0; expected 1.0, 0.0, -1.0 or blank'),
        ("Edema", "yes", r'train.csv row 3, column "Edema": got "yes"; expected 1.0, 0.0, -1.0 or blank'),
        ("Frontal/Lateral", "Sideways", r'column "Frontal/Lateral": got "Sideways"; expected Frontal or Lateral'),
        ("Frontal/Lateral", "", r'row 3, column "Frontal/Lateral": got blank; expected Frontal or Lateral'),
        ("AP/PA", "XY", r'row 3, column "AP/PA": got "XY"; expected AP, PA, LL, RL or blank'),
        ("Age", "sixty", r'row 3, column "Age": got "sixty"; expected a number of years'),
        ("Sex", "M", r'row 3, column "Sex": got "M"; expected Male, Female, Unknown or blank'),
        ("Path", "", r'row 3, column "Path": got blank'),
    ],
)
def test_bad_value_names_row_and_column(tmp_path: Path, column: str, value: str, message: str) -> None:
    rows = [ROWS[0], row_with(ROWS[1], column, value), ROWS[2]]
    with pytest.raises(ValueError, match=message):
        read_labels_csv(write_chexpert(tmp_path, rows))


def test_unknown_and_missing_columns(tmp_path: Path) -> None:
    header = HEADER.replace("Edema", "Edemaa")
    with pytest.raises(ValueError, match=r'unknown column "Edemaa" \(did you mean "Edema"\?\)') as error:
        read_labels_csv(write_chexpert(tmp_path, header=header))
    assert 'missing column "Edema"' in str(error.value)
    with pytest.raises(ValueError, match=r'unknown column "Edemaa"'):  # column problems are never skipped
        load_dataset(data_config(tmp_path / "CheXpert-v1.0-small" / "train.csv", skip_bad=True))


def test_duplicate_column_is_named(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("Path,RG,RG,NRG\na.png,1.0,1.0,0.0\n")
    with pytest.raises(ValueError, match='labels.csv: column "RG" appears twice'):
        read_labels_csv(csv_path, schema=EYE)


def test_malformed_row_is_named(tmp_path: Path) -> None:
    rows = [ROWS[0], ROWS[1] + ",1.0", ROWS[2]]
    with pytest.raises(ValueError, match=r"train.csv row 3: expected 19 fields, got 20"):
        read_labels_csv(write_chexpert(tmp_path, rows))


def test_missing_image_names_row_column_and_file(tmp_path: Path) -> None:
    csv_path = write_chexpert(tmp_path)
    (tmp_path / ROWS[3].split(",")[0]).unlink()
    with pytest.raises(FileNotFoundError, match=r'train.csv row 5, column "Path": image file .*patient00003.* not'):
        load_dataset(data_config(csv_path))
    assert len(load_dataset(data_config(csv_path), check_files=False).frame) == 4


def test_wrong_root_is_named(tmp_path: Path) -> None:
    csv_path = write_chexpert(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"image root .*nowhere does not exist"):
        load_dataset(data_config(csv_path, root=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the 4 image files is under the image root .*empty") as error:
        load_dataset(data_config(csv_path, root=str(tmp_path / "empty"), skip_bad=True))  # never skipped
    assert "Set data.root" in str(error.value)


def test_all_problems_are_collected_then_raised_once(tmp_path: Path) -> None:
    rows = [
        row_with(ROWS[0], "Edema", "2.0"),
        row_with(ROWS[1], "Frontal/Lateral", "Sideways"),
        row_with(ROWS[2], "Age", "old"),
        ROWS[3],
    ]
    csv_path = write_chexpert(tmp_path, rows)
    (tmp_path / ROWS[3].split(",")[0]).unlink()
    with pytest.raises(ValueError) as error:
        load_dataset(data_config(csv_path))
    message = str(error.value)
    for expected in ('row 2, column "Edema"', 'row 3, column "Frontal/Lateral"', 'row 4, column "Age"', "row 5"):
        assert expected in message


def test_many_bad_rows_show_examples_and_a_count(tmp_path: Path) -> None:
    rows = [row_with(ROWS[0], "Edema", "3.0")] * 30
    with pytest.raises(ValueError, match=r"\.\.\. and 25 more bad_label_value problems"):
        read_labels_csv(write_chexpert(tmp_path, rows, images=False))


def test_skip_bad_counts_and_lists_every_skip(tmp_path: Path) -> None:
    rows = [row_with(ROWS[0], "Edema", "2.0"), ROWS[1], ROWS[2], ROWS[3], ROWS[0] + ",extra"]
    csv_path = write_chexpert(tmp_path, rows)
    (tmp_path / ROWS[3].split(",")[0]).unlink()
    images = load_dataset(data_config(csv_path, skip_bad=True))
    assert images.frame["csv_row"].tolist() == [3, 4]
    assert images.report.counts == {MALFORMED_ROW: 1, BAD_LABEL: 1, MISSING_IMAGE: 1}
    assert images.report.rows_skipped == 3
    examples = {(e.reason, e.row) for e in images.report.examples}
    assert examples == {(MALFORMED_ROW, 6), (BAD_LABEL, 2), (MISSING_IMAGE, 5)}
    json.dumps(images.report.to_dict())
    frame, report = read_labels_csv(csv_path, skip_bad=True)
    assert frame["csv_row"].tolist() == [3, 4, 5] and report.rows_skipped == 2


# ---- filters -------------------------------------------------------------------------------


def test_filters_views_projections_observations(tmp_path: Path) -> None:
    csv_path = write_chexpert(tmp_path)
    frontal = load_dataset(data_config(csv_path, views=["Frontal"]))
    assert frontal.frame["csv_row"].tolist() == [2, 3, 5]
    pa_only = load_dataset(data_config(csv_path, projections=["PA"]))
    assert pa_only.frame["csv_row"].tolist() == [5]
    subset = load_dataset(data_config(csv_path, observations=["Edema", "Cardiomegaly"]))
    assert list(subset.frame.columns) == [
        "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Edema", "Cardiomegaly", "csv_row", "image_path"
    ]  # fmt: skip
    assert subset.targets_and_mask()[0].shape == (4, 2)
    with pytest.raises(ValueError, match=r"data.observations: unknown label 'Edemaa'"):
        load_dataset(data_config(csv_path, observations=["Edemaa"]))


def test_select_rows_positive_for(tmp_path: Path) -> None:
    frame, _ = read_labels_csv(write_chexpert(tmp_path, images=False))
    assert select_rows(frame, positive_for=["Edema"])["csv_row"].tolist() == [5]
    assert select_rows(frame, positive_for=["Edema", "Lung Opacity"])["csv_row"].tolist() == [3, 4, 5]
    assert select_rows(frame, views=["Lateral"], positive_for=["Lung Opacity"])["csv_row"].tolist() == [4]
    with pytest.raises(ValueError, match="positive_for: unknown labels"):
        select_rows(frame, positive_for=["Edemaa"])
    with pytest.raises(ValueError, match="no rows left"):
        load_dataset(data_config(tmp_path / "CheXpert-v1.0-small" / "train.csv"), positive_for=["Lung Lesion"])


# ---- images --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "file_format"),
    [(mode, "PNG") for mode in ("L", "RGB", "RGBA", "I;16", "P", "LA", "1")]
    + [(mode, "JPEG") for mode in ("L", "RGB", "CMYK")],
)
def test_load_image_modes(tmp_path: Path, mode: str, file_format: str) -> None:
    image = Image.new(mode, (30, 20), 1 if mode == "1" else 0)
    path = tmp_path / f"image.{file_format.lower()}"
    image.save(path, file_format)
    for source in (path, path.read_bytes()):
        pixels = load_image(source, SIZE_PX, "pad")
        assert pixels.shape == (SIZE_PX, SIZE_PX) and pixels.dtype == np.uint8


def test_sixteen_bit_scales_by_its_own_range(tmp_path: Path) -> None:
    values = np.tile(np.linspace(1000, 3000, 32), (32, 1)).astype(np.uint16)  # a 12-bit-style ramp
    path = tmp_path / "ramp16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = load_image(path, 32, "pad")
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.all(np.diff(pixels[0].astype(int)) >= 0)  # still a ramp, left to right


def test_transparent_pixels_become_black(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 8:, 3] = 255  # left half transparent white, right half opaque white
    pixels = load_image(_png_bytes(Image.fromarray(rgba, "RGBA")), 16, "pad")
    assert pixels[:, :8].max() == 0 and pixels[:, 8:].min() == 255


def test_pad_keeps_aspect_with_black_bars_centred() -> None:
    wide = load_image(_png_bytes(Image.new("L", (40, 20), 255)), 16, "pad")
    assert wide[:4].max() == 0 and wide[12:].max() == 0 and wide[4:12].min() == 255
    tall = load_image(_png_bytes(Image.new("L", (20, 40), 255)), 16, "pad")
    assert tall[:, :4].max() == 0 and tall[:, 12:].max() == 0 and tall[:, 4:12].min() == 255


def test_crop_keeps_the_centre() -> None:
    stripes = np.zeros((20, 60), np.uint8)
    stripes[:, 20:40] = 255  # only the centre third is white
    pixels = load_image(_png_bytes(Image.fromarray(stripes)), 16, "crop")
    # The centred square is the white stripe; only its edge columns blend a little (antialiasing).
    assert pixels[:, 1:-1].min() == 255 and pixels.min() > 200


@pytest.mark.parametrize("resize_mode", ["pad", "crop"])
@pytest.mark.parametrize("file_format", ["PNG", "JPEG"])
def test_never_flips(tmp_path: Path, resize_mode: str, file_format: str) -> None:
    pixels = np.zeros((320, 400), np.uint8)
    pixels[40:120, 60:160] = 255  # a marker up and to the left
    path = tmp_path / f"marker.{file_format.lower()}"
    Image.fromarray(pixels).save(path, file_format)
    out = load_image(path, 32, resize_mode).astype(int)
    assert out[:16, :16].mean() > 3 * out[16:, 16:].mean() + 20
    assert out[:16, :16].mean() > out[:16, 16:].mean() and out[:16, :16].mean() > out[16:, :16].mean()


def test_load_image_errors(tmp_path: Path) -> None:
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    with pytest.raises(UndecodableImageError, match=r"cannot decode image .*garbage.png"):
        load_image(tmp_path / "garbage.png", SIZE_PX)
    with pytest.raises(FileNotFoundError, match=r"image file .*absent.png does not exist"):
        load_image(tmp_path / "absent.png", SIZE_PX)
    with pytest.raises(ValueError, match="resize_mode"):
        load_image(b"", SIZE_PX, "stretch")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ---- other label sets: the schema is data --------------------------------------------------


def test_eye_schema(tmp_path: Path) -> None:
    csv_path = tmp_path / "eye" / "labels.csv"
    for name in ("RG/a.png", "NRG/b.jpg"):
        write_gray(tmp_path / "eye" / name)
    csv_path.write_text("Path,RG,NRG\nRG/a.png,1.0,0.0\nNRG/b.jpg,0.0,1.0\n")
    images = load_dataset(data_config(csv_path, observations=["RG", "NRG"]), schema=EYE)
    # The same set described by configuration alone: no schema object, no code.
    configured = load_dataset(data_config(csv_path, label_columns=["RG", "NRG"]))
    assert configured.observations == ("RG", "NRG")
    pd.testing.assert_frame_equal(configured.frame, images.frame)
    assert list(images.frame.columns) == ["Path", "RG", "NRG", "csv_row", "image_path"]
    assert images.targets_and_mask()[0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert images.to_torch_dataset()[1]["image"].shape == (1, SIZE_PX, SIZE_PX)
    with pytest.raises(ValueError, match='unknown column "Sex"'):
        read_labels_csv(write_chexpert(tmp_path), schema=EYE)
    csv_path.write_text("Path,RG,NRG\nRG/a.png,1.0,0.5\n")
    with pytest.raises(ValueError, match='labels.csv row 2, column "NRG": got 0.5'):
        read_labels_csv(csv_path, schema=EYE)


# ---- torch ---------------------------------------------------------------------------------


def test_torch_dataset(tmp_path: Path) -> None:
    images = load_dataset(data_config(write_chexpert(tmp_path), observations=["Cardiomegaly", "Edema"]))
    dataset = images.to_torch_dataset()
    assert isinstance(dataset, torch.utils.data.Dataset) and len(dataset) == 4
    item = dataset[1]
    assert item["image"].shape == (1, SIZE_PX, SIZE_PX) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["path"] == ROWS[1].split(",")[0]
    assert item["targets"].tolist() == [0.0, 0.0] and item["mask"].tolist() == [0.0, 0.0]  # both -1.0: U-Ignore
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 1, SIZE_PX, SIZE_PX) and batch["targets"].shape == (4, 2)
    ones = load_dataset(data_config(tmp_path / "CheXpert-v1.0-small" / "train.csv", uncertainty_policy="U-Ones"))
    assert ones.to_torch_dataset()[1]["targets"][ones.observations.index("Cardiomegaly")] == 1.0


def test_torch_dataset_undecodable_raises_or_skips(tmp_path: Path) -> None:
    csv_path = write_chexpert(tmp_path)
    (tmp_path / ROWS[2].split(",")[0]).write_bytes(b"\xff\xd8 truncated jpeg")
    dataset = load_dataset(data_config(csv_path)).to_torch_dataset()
    with pytest.raises(UndecodableImageError, match=r"train.csv row 4: cannot decode image .*view2_lateral.jpg"):
        dataset[2]
    skipping = LabelledImageDataset(load_dataset(data_config(csv_path, skip_bad=True)))
    batch = collate_skipping_bad([skipping[i] for i in range(4)])
    assert batch["image"].shape == (3, 1, SIZE_PX, SIZE_PX)
    assert skipping.report.counts == {UNDECODABLE_IMAGE: 1} and skipping.report.examples[0].row == 4


# ---- Ray -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_dataset_rows(tmp_path: Path, local_ray: None) -> None:
    images = load_dataset(data_config(write_chexpert(tmp_path), observations=["Cardiomegaly", "Lung Opacity"]))
    rows = sorted(images.to_ray_dataset(rows_per_block=2).take_all(), key=lambda r: r["csv_row"])
    targets, mask = images.targets_and_mask()
    assert [r["Path"] for r in rows] == [row.split(",")[0] for row in ROWS]
    for row, expected_targets, expected_mask in zip(rows, targets, mask, strict=True):
        assert row["image"].shape == (SIZE_PX, SIZE_PX) and row["image"].dtype == np.uint8
        assert row["targets"].dtype == np.float32 and row["targets"].tolist() == expected_targets.tolist()
        assert row["mask"].tolist() == expected_mask.tolist()
    assert rows[2]["Frontal/Lateral"] == "Lateral" and rows[2]["targets"].tolist() == [0.0, 1.0]
    assert rows[1]["mask"].tolist() == [0.0, 1.0]  # Cardiomegaly -1.0 under U-Ignore


def test_ray_dataset_from_the_phantom(tmp_path: Path, local_ray: None) -> None:
    from medsd.config import PhantomConfig
    from medsd.labels import COMPETITION_FIVE
    from medsd.phantom import write_phantom

    write_phantom(tmp_path / "phantom", PhantomConfig(n_images=30, image_size_px=48, seed=5))
    images = load_dataset(
        DataConfig(csv=str(tmp_path / "phantom" / "train.csv"), observations=list(COMPETITION_FIVE), image_size_px=32)
    )
    rows = images.to_ray_dataset().take_all()
    assert len(rows) == len(images.frame) > 0
    by_path = {row["Path"]: row for row in rows}
    targets, _ = images.targets_and_mask()
    for path, expected in zip(images.frame["Path"], targets, strict=True):
        assert by_path[path]["image"].shape == (32, 32)
        assert by_path[path]["targets"].tolist() == expected.tolist()
        # The decoded pixels are the PNG on disk, resized: a bright thorax, not an empty frame.
        assert by_path[path]["image"].mean() > 20


def test_ray_dataset_undecodable_raises_or_skips(tmp_path: Path, local_ray: None) -> None:
    csv_path = write_chexpert(tmp_path)
    (tmp_path / ROWS[3].split(",")[0]).write_bytes(b"not a jpeg")
    with pytest.raises(ray.exceptions.RayTaskError, match=r"train.csv row 5: cannot decode image .*patient00003"):
        load_dataset(data_config(csv_path)).to_ray_dataset().materialize()
    images = load_dataset(data_config(csv_path, skip_bad=True))
    dataset = images.to_ray_dataset(rows_per_block=2)
    assert dataset.count() == 3 and dataset.count() == 3  # consumed twice, the skip is counted once
    skips = images.decode_skips()
    assert skips.counts == {UNDECODABLE_IMAGE: 1} and skips.rows_skipped == 1 and skips.examples[0].row == 5
    images.report.merge(skips)  # one report for a manifest: load-time and decode-time skips
    assert images.report.counts == {UNDECODABLE_IMAGE: 1} and images.report.rows_skipped == 1


# ---- inspect -------------------------------------------------------------------------------


def test_inspect_counts_everything(tmp_path: Path) -> None:
    inspection = inspect_dataset(write_chexpert(tmp_path))
    assert not inspection.has_errors
    assert inspection.rows == 4
    assert inspection.images == {"checked": 4, "found": 4, "missing": 0, "undecodable": 0}
    assert inspection.labels["Cardiomegaly"] == {"positive": 0, "negative": 0, "uncertain": 1, "blank": 3, "invalid": 0}
    assert inspection.labels["Pneumothorax"] == {"positive": 0, "negative": 2, "uncertain": 0, "blank": 2, "invalid": 0}
    assert inspection.views == {"Frontal": 3, "Lateral": 1}
    assert inspection.projections == {"AP": 2, "PA": 1, "blank": 1}
    assert inspection.sexes == {"Female": 3, "Male": 1}
    assert inspection.age == {"min": 41.0, "median": 75.5, "max": 87.0, "missing": 0, "invalid": 0}
    assert json.loads(json.dumps(inspection.to_dict()))["has_errors"] is False
    text = inspection.to_text()
    assert "Rows      4" in text and "Cardiomegaly" in text and "Problems  none" in text


def test_inspect_reports_problems_without_raising(tmp_path: Path) -> None:
    rows = [row_with(ROWS[0], "Edema", "2.0"), ROWS[1], ROWS[2], row_with(ROWS[3], "Age", "")]
    csv_path = write_chexpert(tmp_path, rows)
    (tmp_path / ROWS[1].split(",")[0]).unlink()
    (tmp_path / ROWS[2].split(",")[0]).write_bytes(b"broken")
    inspection = inspect_dataset(csv_path)
    assert inspection.has_errors
    assert inspection.images == {"checked": 4, "found": 3, "missing": 1, "undecodable": 1}
    assert inspection.labels["Edema"]["invalid"] == 1
    assert inspection.age["missing"] == 1
    assert inspection.problems.counts == {BAD_LABEL: 1, MISSING_IMAGE: 1, UNDECODABLE_IMAGE: 1}
    text = inspection.to_text()
    assert 'train.csv row 2, column "Edema": got 2.0' in text and "row 3" in text and "row 4" in text
    without_images = inspect_dataset(csv_path, check_images=False)
    assert without_images.images is None and without_images.problems.counts == {BAD_LABEL: 1}


def test_inspect_wrong_columns_and_unreadable_csv(tmp_path: Path) -> None:
    inspection = inspect_dataset(write_chexpert(tmp_path, header=HEADER.replace("Edema", "Oedema")))
    assert inspection.has_errors and "Edema" not in inspection.labels
    assert 'missing column "Edema"' in inspection.to_text()
    with pytest.raises(FileNotFoundError, match="absent.csv does not exist"):
        inspect_dataset(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: empty file"):
        inspect_dataset(tmp_path / "empty.csv")
