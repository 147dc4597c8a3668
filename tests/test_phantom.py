import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsd import phantom
from medsd.config import PhantomConfig
from medsd.labels import CHEXPERT, CHEXPERT_OBSERVATIONS, NO_FINDING, PATH_COLUMN
from medsd.phantom import (
    MANIFEST_NAME,
    OPACITY_CHILDREN,
    PhantomSummary,
    _resolve_signs,
    render_phantom_images,
    render_radiograph,
    sample_study_labels,
    write_phantom,
)

# Small and quick, with enough laterals and valid patients to exercise every rule.
SMALL = PhantomConfig(n_images=160, image_size_px=32, seed=3, valid_fraction=0.2, lateral_fraction=0.3)
LABEL_CELLS = {"1.0", "0.0", "-1.0", ""}
PATH_PATTERN = re.compile(r"^(train|valid)/patient\d{5}/study[12]/view(1_frontal|2_lateral)\.png$")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, PhantomSummary]:
    out = tmp_path_factory.mktemp("phantom") / "small"
    return out, write_phantom(out, SMALL)


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The CSV as text cells, so formatting (1.0 vs 1, blank vs nan) is what is checked."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("split", ["train", "valid"])
def test_csv_has_chexpert_columns_in_order(small, split):
    out, _ = small
    header, rows = read_rows(out / f"{split}.csv")
    assert header == list(CHEXPERT.columns)
    assert rows, f"{split}.csv has no rows"


def test_csv_cells_are_formatted_like_chexpert(small):
    out, _ = small
    _, rows = read_rows(out / "train.csv")
    for row in rows:
        assert PATH_PATTERN.match(row["Path"]), row["Path"]
        assert row["Sex"] in ("Male", "Female")
        assert row["Age"].isdigit() and 18 <= int(row["Age"]) <= 90
        is_frontal = row["Path"].endswith("view1_frontal.png")
        assert row["Frontal/Lateral"] == ("Frontal" if is_frontal else "Lateral")
        assert row["AP/PA"] in (("AP", "PA") if is_frontal else ("",))
        assert {row[o] for o in CHEXPERT_OBSERVATIONS} <= LABEL_CELLS
    cells = [row[o] for row in rows for o in CHEXPERT_OBSERVATIONS]
    assert "-1.0" in cells and "" in cells and "0.0" in cells and "1.0" in cells
    assert cells.count("") > len(cells) / 2, "most CheXpert cells are blank (not mentioned)"


def test_valid_csv_is_consensus_without_blanks_or_uncertain(small):
    out, _ = small
    _, rows = read_rows(out / "valid.csv")
    for row in rows:
        assert {row[o] for o in CHEXPERT_OBSERVATIONS} <= {"1.0", "0.0"}, row["Path"]
        pathologies = [o for o in CHEXPERT_OBSERVATIONS if o not in (NO_FINDING, "Support Devices")]
        others_positive = any(row[o] == "1.0" for o in pathologies)
        assert row[NO_FINDING] == ("0.0" if others_positive else "1.0")


def test_every_path_is_a_single_channel_png_of_the_configured_size(small):
    out, _ = small
    for split in ("train", "valid"):
        frame = pd.read_csv(out / f"{split}.csv")
        assert frame[PATH_COLUMN].str.startswith(f"{split}/").all()
        for path in frame[PATH_COLUMN]:
            with Image.open(out / path) as image:
                assert (image.mode, image.size) == ("L", (SMALL.image_size_px, SMALL.image_size_px))


def test_counts_split_and_summary(small):
    out, summary = small
    train, valid = pd.read_csv(out / "train.csv"), pd.read_csv(out / "valid.csv")
    assert (summary.n_train, summary.n_valid) == (len(train), len(valid))
    assert summary.n_train + summary.n_valid == SMALL.n_images
    both = pd.concat([train, valid])
    assert summary.n_lateral == (both["Frontal/Lateral"] == "Lateral").sum() > 0
    assert summary.out == out and summary.seconds > 0
    assert "train" in str(summary) and "valid" in str(summary)

    def patients(frame: pd.DataFrame) -> set[str]:
        return set(frame[PATH_COLUMN].str.split("/").str[1])

    assert not patients(train) & patients(valid), "a patient is in both splits"
    assert len(patients(valid)) == round(SMALL.valid_fraction * len(patients(train) | patients(valid)))
    assert both[PATH_COLUMN].str.contains("/study2/").any(), "some patients have a second study"
    # A lateral shares its study's labels with the frontal.
    for _, study in both.assign(study=both[PATH_COLUMN].str.rsplit("/", n=1).str[0]).groupby("study"):
        assert study[list(CHEXPERT_OBSERVATIONS)].nunique(dropna=False).max() == 1


def test_same_config_gives_byte_identical_files_and_another_seed_does_not(small, tmp_path):
    out, _ = small
    write_phantom(tmp_path / "again", SMALL)
    assert file_digests(tmp_path / "again") == file_digests(out)

    write_phantom(tmp_path / "other", SMALL.model_copy(update={"seed": 4}))
    first, other = file_digests(out), file_digests(tmp_path / "other")
    assert first["train.csv"] != other["train.csv"]
    shared = set(first) & set(other) - {"train.csv", "valid.csv", MANIFEST_NAME}
    assert shared and all(first[p] != other[p] for p in shared)


def test_rerun_reuses_a_complete_folder(small):
    out, summary = small
    png = next(out.rglob("*.png"))
    before = png.stat().st_mtime_ns
    again = write_phantom(out, SMALL)
    assert (again.n_train, again.n_valid, again.n_lateral) == (summary.n_train, summary.n_valid, summary.n_lateral)
    assert png.stat().st_mtime_ns == before
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a staging folder was left behind"


def test_refuses_to_overwrite_other_data(small, tmp_path):
    out, _ = small
    with pytest.raises(FileExistsError, match="another config"):
        write_phantom(out, SMALL.model_copy(update={"seed": 99}))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_phantom(busy, SMALL)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_phantom(a_file, SMALL)


def test_writes_into_an_existing_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = write_phantom(empty, PhantomConfig(n_images=3, image_size_px=32, seed=0))
    assert summary.n_train + summary.n_valid == 3 and (empty / MANIFEST_NAME).is_file()


def test_label_prevalence_and_co_occurrence_resemble_chexpert_train():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame([sample_study_labels(rng) for _ in range(4000)], columns=list(CHEXPERT_OBSERVATIONS))
    positive = (frame == 1.0).mean()
    # Loose bounds around CheXpert train (Irvin et al. 2019, Table 1).
    expected = {
        "Support Devices": (0.42, 0.60),
        "Lung Opacity": (0.38, 0.56),
        "Pleural Effusion": (0.31, 0.46),
        "Edema": (0.17, 0.29),
        "Atelectasis": (0.10, 0.20),
        "Cardiomegaly": (0.08, 0.16),
        "Pneumothorax": (0.05, 0.13),
        "Consolidation": (0.04, 0.10),
        NO_FINDING: (0.05, 0.14),
    }
    for observation, (low, high) in expected.items():
        assert low <= positive[observation] <= high, (observation, positive[observation])
    uncertain = (frame == -1.0).mean()
    for observation in ("Atelectasis", "Edema", "Consolidation", "Cardiomegaly"):
        assert 0.02 <= uncertain[observation] <= 0.2, (observation, uncertain[observation])
    assert frame.isna().to_numpy().mean() > 0.5, "blank should be the majority"
    edema, cardiomegaly = frame["Edema"] == 1.0, frame["Cardiomegaly"] == 1.0
    assert cardiomegaly[edema].mean() > 1.5 * cardiomegaly[~edema].mean(), "edema should come with cardiomegaly"
    # Lung Opacity accompanies its child findings; No Finding only when no pathology is positive or uncertain.
    assert (frame.loc[(frame[list(OPACITY_CHILDREN)] == 1.0).any(axis=1), "Lung Opacity"] == 1.0).all()
    pathologies = [o for o in CHEXPERT_OBSERVATIONS if o not in (NO_FINDING, "Support Devices")]
    normal = frame[NO_FINDING] == 1.0
    assert not frame.loc[normal, pathologies].isin([1.0, -1.0]).any().any()


def test_uncertain_mentions_show_their_sign_about_half_the_time():
    rng = np.random.default_rng(1)
    shown = [_resolve_signs({"Edema": -1.0, "Cardiomegaly": 1.0}, rng) for _ in range(2000)]
    assert 0.45 < np.mean([s["Edema"] for s in shown]) < 0.55
    assert all(s["Cardiomegaly"] == 1.0 and s[NO_FINDING] == 0.0 and s["Atelectasis"] == 0.0 for s in shown)


def test_render_radiograph_is_deterministic_and_views_differ():
    def render(view: str, seed: int = 0) -> np.ndarray:
        return render_radiograph({"Cardiomegaly": 1.0}, view, "Female", 70, 48, np.random.default_rng(seed))

    frontal = render("Frontal")
    assert frontal.shape == (48, 48) and frontal.dtype == np.uint8
    assert np.array_equal(frontal, render("Frontal"))
    assert not np.array_equal(frontal, render("Frontal", seed=1))
    assert np.abs(frontal.astype(int) - render("Lateral")).mean() > 10
    assert frontal.std() > 20, "a radiograph has contrast"


def test_cardiomegaly_widens_the_heart_shadow():
    """The bright band across the lower chest is wider with cardiomegaly, on average over patients."""

    def bright_width(findings: dict[str, float], seed: int) -> float:
        image = render_radiograph(findings, "Frontal", "Male", 50, 64, np.random.default_rng(seed))
        row = image[36:42].mean(axis=0)  # about the heart's widest level
        return float((row[8:56] > np.percentile(image, 70)).mean())

    normal = np.mean([bright_width({}, s) for s in range(20)])
    enlarged = np.mean([bright_width({"Cardiomegaly": 1.0}, s) for s in range(20)])
    assert enlarged > normal + 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"view": "Oblique"}, "view"),
        ({"sex": "M"}, "sex"),
        ({"size_px": 8}, "size_px"),
        ({"findings": {"Cardiomegally": 1.0}}, "Cardiomegally"),
        ({"findings": {"Edema": 2.0}}, r"findings\['Edema'\]: got 2.0"),
    ],
)
def test_render_radiograph_rejects_bad_arguments(kwargs, message):
    arguments = {"findings": {}, "view": "Frontal", "sex": "Male", "age": 40, "size_px": 32}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        render_radiograph(**arguments, rng=np.random.default_rng(0))


def test_render_phantom_images_are_the_images_write_phantom_writes(tmp_path):
    cfg = PhantomConfig(n_images=40, image_size_px=32, seed=7)  # default view and split fractions
    images, labels = render_phantom_images(cfg.n_images, cfg.image_size_px, cfg.seed)
    assert images.shape == (40, 32, 32) and images.dtype == np.uint8
    assert list(labels.columns) == [c for c in CHEXPERT.columns if c != PATH_COLUMN]
    assert len(labels) == 40 and (labels["Frontal/Lateral"] == "Frontal").mean() > 0.5
    assert labels.loc[labels["Frontal/Lateral"] == "Lateral", "AP/PA"].isna().all()

    write_phantom(tmp_path / "written", cfg)
    written = pd.concat([pd.read_csv(tmp_path / "written" / f"{split}.csv") for split in ("train", "valid")])

    def digest(pixels: np.ndarray) -> str:
        return hashlib.sha256(pixels.tobytes()).hexdigest()

    on_disk = sorted(digest(np.asarray(Image.open(tmp_path / "written" / p))) for p in written[PATH_COLUMN])
    assert on_disk == sorted(digest(image) for image in images)


def test_render_phantom_images_is_the_same_in_parallel_and_in_series(monkeypatch):
    serial, _ = render_phantom_images(12, 32, 5)
    monkeypatch.setattr(phantom, "_PARALLEL_MIN_PIXELS", 0)  # force the worker pool used for big datasets
    parallel, _ = render_phantom_images(12, 32, 5)
    assert np.array_equal(parallel, serial)


def test_render_phantom_images_rejects_no_images():
    with pytest.raises(ValueError, match="n: got 0"):
        render_phantom_images(0, 32, 0)


def test_a_concurrent_writer_finishing_first_is_not_an_error(tmp_path, monkeypatch):
    out = tmp_path / "shared"
    cfg = PhantomConfig(n_images=4, image_size_px=32, seed=1)
    original = phantom._write_dataset

    def write_while_another_process_also_does(folder: Path, config: PhantomConfig):
        counts = original(folder, config)
        out.mkdir()
        original(out, config)  # the other writer renames its complete folder into place first
        return counts

    monkeypatch.setattr(phantom, "_write_dataset", write_while_another_process_also_does)
    summary = write_phantom(out, cfg)
    assert summary.n_train + summary.n_valid == 4
    assert (out / MANIFEST_NAME).is_file()
    assert not list(tmp_path.glob(".shared.partial-*"))
