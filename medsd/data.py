"""Read and validate CheXpert-style datasets (a CSV of Path + labels, and an image folder).

Outputs a pandas frame, a streaming Ray Dataset or a torch Dataset; every path decodes images
through :func:`load_image`. Bad input is collected and raised once, or, with ``skip_bad``,
skipped and counted in a :class:`BadInputReport`.

Row numbers in every message are lines of the CSV as an editor or a spreadsheet shows them:
the header is row 1, so the first data row is row 2.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import torch
from PIL import Image
from tqdm import tqdm

from medsd.config import DataConfig
from medsd.labels import (
    AGE_COLUMN,
    ALLOWED_LABEL_VALUES,
    CHEXPERT,
    NEGATIVE,
    PATH_COLUMN,
    POSITIVE,
    PROJECTION_COLUMN,
    PROJECTIONS,
    SEX_COLUMN,
    SEXES,
    UNCERTAIN,
    VIEW_COLUMN,
    VIEWS,
    LabelSchema,
    apply_uncertainty_policy,
)

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

# Extra columns medsd adds to a frame: the CSV line a row came from, and its absolute image file.
CSV_ROW_COLUMN = "csv_row"
IMAGE_PATH_COLUMN = "image_path"
RESIZE_MODES = ("pad", "crop")

# Problem reasons. Column problems mean the wrong schema: fatal even with skip_bad.
MISSING_COLUMN = "missing_column"
UNKNOWN_COLUMN = "unknown_column"
DUPLICATE_COLUMN = "duplicate_column"
WRONG_ROOT = "wrong_root"
MALFORMED_ROW = "malformed_row"
BLANK_PATH = "blank_path"
BAD_LABEL = "bad_label_value"
BAD_VIEW = "bad_view"
BAD_PROJECTION = "bad_projection"
BAD_SEX = "bad_sex"
BAD_AGE = "bad_age"
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
FATAL_REASONS = frozenset({MISSING_COLUMN, UNKNOWN_COLUMN, DUPLICATE_COLUMN, WRONG_ROOT})

# Categorical metadata: allowed values, and whether blank is allowed (AP/PA is blank on laterals).
_CATEGORY_RULES: dict[str, tuple[tuple[str, ...], bool, str]] = {
    VIEW_COLUMN: (VIEWS, False, BAD_VIEW),
    PROJECTION_COLUMN: (PROJECTIONS, True, BAD_PROJECTION),
    SEX_COLUMN: (SEXES, True, BAD_SEX),
}
_LABEL_EXPECTED = "1.0, 0.0, -1.0 or blank"
_IMAGE_PROBE_ROWS = 20  # first Paths tried when deciding what the image root is
_INSPECT_IMAGE_SIDE_PX = 32  # decoding at a small size still reads every byte of the file


class UndecodableImageError(ValueError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


# ----------------------------------------------------------------------------------------------
# Problems and the report


@dataclass(frozen=True)
class BadInput:
    """One problem: why, the message a user reads, and where (CSV row, column, image file)."""

    reason: str
    message: str
    row: int | None = None
    column: str | None = None
    file: str | None = None


@dataclass
class BadInputReport:
    """Problems counted per reason, with the first ``max_examples`` of each reason kept as examples."""

    source: str
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[BadInput] = field(default_factory=list)
    rows_skipped: int = 0
    max_examples: int = 20

    def add(self, reason: str, count: int, examples: Iterable[BadInput] = ()) -> None:
        """Count ``count`` problems of ``reason``; keep examples up to ``max_examples`` for that reason."""
        if count <= 0:
            return
        kept = sum(1 for e in self.examples if e.reason == reason)
        for example in examples:
            if kept >= self.max_examples:
                break
            self.examples.append(example)
            kept += 1
        self.counts[reason] = self.counts.get(reason, 0) + count

    def merge(self, other: BadInputReport) -> None:
        """Add another report's counts, examples and skipped rows to this one."""
        for reason, count in other.counts.items():
            self.add(reason, count, [e for e in other.examples if e.reason == reason])
        self.rows_skipped += other.rows_skipped

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def has_problems(self) -> bool:
        return self.total > 0

    @property
    def has_fatal(self) -> bool:
        return any(reason in FATAL_REASONS for reason in self.counts)

    def summary(self) -> str:
        """One line: 'no problems' or the counts per reason and the rows skipped."""
        if not self.has_problems:
            return f"{self.source}: no problems"
        counts = ", ".join(f"{reason} {count:,}" for reason, count in self.counts.items())
        skipped = f"; {self.rows_skipped:,} rows skipped" if self.rows_skipped else ""
        return f"{self.source}: {_problems_text(self.total)} ({counts}){skipped}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for manifests and `medsd data inspect --json`."""
        return {
            "source": self.source,
            "counts": dict(self.counts),
            "rows_skipped": self.rows_skipped,
            "examples": [e.__dict__ for e in self.examples],
        }

    def to_text(self, examples_per_reason: int = 5) -> str:
        """Every reason with its count and first examples, one problem per line."""
        lines = []
        for reason, count in self.counts.items():
            examples = [e for e in self.examples if e.reason == reason][:examples_per_reason]
            lines.extend(f"  {e.message}" for e in examples)
            if count > len(examples):
                lines.append(f"  ... and {count - len(examples):,} more {reason} problems")
        return "\n".join(lines)

    def raise_if_problems(self, skip_bad: bool) -> None:
        """Raise once with every problem, unless all of them may be skipped (``skip_bad``, nothing fatal).

        FileNotFoundError when every problem is a missing file or folder, ValueError otherwise.
        """
        if not self.has_problems or (skip_bad and not self.has_fatal):
            return
        message = (
            f"{self.source}: {_problems_text(self.total)} (row numbers are lines of the file; the header is row 1):\n"
            f"{self.to_text()}\n{_fix_hint(self)}"
        )
        if set(self.counts) <= {MISSING_IMAGE, WRONG_ROOT}:
            raise FileNotFoundError(message)
        raise ValueError(message)


def _problems_text(count: int) -> str:
    return f"{count:,} problem" + ("" if count == 1 else "s")


def _fix_hint(report: BadInputReport) -> str:
    if report.counts.keys() & {MISSING_COLUMN, UNKNOWN_COLUMN, DUPLICATE_COLUMN}:
        return "Fix the header, or pass the LabelSchema whose columns this file has (schema=...)."
    if WRONG_ROOT in report.counts:
        return "Set data.root (--root) to the folder the Paths are under, or its dataset folder."
    return "Fix these rows, or set data.skip_bad=true to skip bad rows and images (each skip is counted)."


# ----------------------------------------------------------------------------------------------
# Reading and validating the CSV


@dataclass
class CheckedCsv:
    """Every row of a CSV with its problems found; nothing raised or dropped yet.

    ``bad_rows`` flags rows with any problem; ``invalid_cells`` holds, per checked column, the
    cells that broke a rule (inspect counts them).
    """

    frame: pd.DataFrame
    bad_rows: np.ndarray
    report: BadInputReport
    invalid_cells: dict[str, np.ndarray]


def read_labels_csv(
    csv_path: str | os.PathLike, schema: LabelSchema = CHEXPERT, skip_bad: bool = False
) -> tuple[pd.DataFrame, BadInputReport]:
    """Read and validate a CSV of ``schema`` -> (frame, report).

    The frame has the schema's columns in schema order plus ``csv_row``. Raises once listing
    every problem, or with ``skip_bad`` drops bad rows and counts them in the report.
    """
    checked = check_labels_csv(csv_path, schema)
    checked.report.raise_if_problems(skip_bad)
    return _skip_bad_rows(checked), checked.report


def check_labels_csv(csv_path: str | os.PathLike, schema: LabelSchema = CHEXPERT) -> CheckedCsv:
    """Read a CSV and collect every problem in it without raising on them.

    Raises only when the CSV cannot be read at all: FileNotFoundError, or ValueError for an
    empty file or one that is not CSV.
    """
    csv_path = Path(csv_path)
    report = BadInputReport(source=str(csv_path))
    header = _read_header(csv_path)
    _check_columns(csv_path.name, header, schema, report)
    frame, malformed = _read_rows(csv_path, header, schema)
    _report_malformed_rows(csv_path.name, malformed, len(header), report)
    invalid_cells = _check_values(csv_path.name, frame, schema, report)
    bad_rows = np.zeros(len(frame), dtype=bool)
    for cells in invalid_cells.values():
        bad_rows |= cells
    return CheckedCsv(frame, bad_rows, report, invalid_cells)


def _read_header(csv_path: Path) -> list[str]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file {csv_path} does not exist")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise ValueError(f"{csv_path}: empty file; expected a header row of column names")
    return header


def _check_columns(name: str, header: list[str], schema: LabelSchema, report: BadInputReport) -> None:
    """Missing, unknown and duplicate columns, each with the nearest valid spelling."""
    seen: set[str] = set()
    for column in header:
        if column in seen:
            report.add(DUPLICATE_COLUMN, 1, [BadInput(DUPLICATE_COLUMN, f'{name}: column "{column}" appears twice')])
        seen.add(column)
    for column in header:
        if column not in schema.columns:
            nearest = difflib.get_close_matches(column, schema.columns, n=1)
            hint = f' (did you mean "{nearest[0]}"?)' if nearest else ""
            message = f'{name}: unknown column "{column}"{hint} for schema {schema.name!r}'
            report.add(UNKNOWN_COLUMN, 1, [BadInput(UNKNOWN_COLUMN, message, row=1, column=column)])
    for column in schema.columns:
        if column not in seen:
            message = f'{name}: missing column "{column}" of schema {schema.name!r}'
            report.add(MISSING_COLUMN, 1, [BadInput(MISSING_COLUMN, message, row=1, column=column)])


def _read_rows(csv_path: Path, header: list[str], schema: LabelSchema) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """Schema columns of every row -> (frame with ``csv_row``, malformed rows as (row, text)).

    pyarrow's reader (multi-threaded, typed at parse time) keeps this within about the time of a
    plain ``pandas.read_csv``. Numbers are parsed as float32; if any cell is not a number the file
    is re-read with those columns as text so every such cell can be reported, not just the first.
    """
    names = _unique_names(header)
    columns = [c for c in schema.columns if c in header]
    try:
        table, malformed = _read_table(csv_path, names, columns, schema, numbers_as_text=False)
    except pa.ArrowInvalid:
        table, malformed = _read_table(csv_path, names, columns, schema, numbers_as_text=True)
    if any(row is None for row, _ in malformed):
        # Row numbers of malformed rows are only known to a single-threaded reader; this is rare.
        table, malformed = _read_table(csv_path, names, columns, schema, numbers_as_text=True, use_threads=False)
    frame = table.to_pandas()
    frame[CSV_ROW_COLUMN] = _row_numbers(len(frame), [row for row, _ in malformed])
    return _drop_rows(frame, _blank_lines(frame, columns)), malformed


def _blank_lines(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Rows read from empty lines (every cell blank): not records, as pandas skips them too."""
    blank = np.zeros(len(frame), dtype=bool)
    candidates = np.flatnonzero(frame[columns[0]].isna().to_numpy()) if columns else []  # only these need a look
    if len(candidates):
        blank[candidates[frame[columns].iloc[candidates].isna().all(axis=1).to_numpy()]] = True
    return blank


def _unique_names(header: list[str]) -> list[str]:
    """Header names with repeats renamed ('Edema', 'Edema (2)') so the reader can address each column."""
    names: list[str] = []
    for column in header:
        name, n = column, 1
        while name in names:
            n += 1
            name = f"{column} ({n})"
        names.append(name)
    return names


def _read_table(
    csv_path: Path,
    names: list[str],
    columns: list[str],
    schema: LabelSchema,
    numbers_as_text: bool,
    use_threads: bool = True,
) -> tuple[pa.Table, list[tuple[int | None, str]]]:
    malformed: list[tuple[int | None, str]] = []

    def skip_malformed(row: pa_csv.InvalidRow) -> str:
        malformed.append((row.number, row.text))
        return "skip"

    number = pa.string() if numbers_as_text else pa.float32()
    types = {c: _column_type(c, schema, number) for c in columns}
    try:
        table = pa_csv.read_csv(
            csv_path,
            read_options=pa_csv.ReadOptions(column_names=names, skip_rows=1, use_threads=use_threads),
            parse_options=pa_csv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=skip_malformed),
            convert_options=pa_csv.ConvertOptions(
                column_types=types,
                include_columns=columns,
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as error:
        if numbers_as_text:
            raise ValueError(f"{csv_path}: cannot be read as CSV: {error}") from None
        raise
    return table, malformed


def _column_type(column: str, schema: LabelSchema, number: pa.DataType) -> pa.DataType:
    if column in schema.observations or column == AGE_COLUMN:
        return number
    if column in _CATEGORY_RULES:
        return pa.dictionary(pa.int32(), pa.string())  # -> pandas category: small and fast to compare
    return pa.string()


def _row_numbers(n_rows: int, malformed_rows: list[int]) -> np.ndarray:
    """File row (line) of each parsed row: lines 2.. in order, minus the malformed rows the reader skipped."""
    lines = np.arange(2, n_rows + len(malformed_rows) + 2, dtype=np.int64)
    if malformed_rows:
        lines = lines[~np.isin(lines, malformed_rows)]
    return lines


def _report_malformed_rows(
    name: str, malformed: list[tuple[int | None, str]], n_columns: int, report: BadInputReport
) -> None:
    examples = []
    for row, text in malformed[: report.max_examples]:
        n_fields = len(next(csv.reader([text]), []))
        message = f"{name} row {row}: expected {n_columns} fields, got {n_fields}: {text[:80]!r}"
        examples.append(BadInput(MALFORMED_ROW, message, row=row))
    report.add(MALFORMED_ROW, len(malformed), examples)


def _check_values(name: str, frame: pd.DataFrame, schema: LabelSchema, report: BadInputReport) -> dict[str, np.ndarray]:
    """Vectorised checks of every present column -> invalid cells per column; counts and examples into ``report``."""
    cells = _CellProblems(name, frame[CSV_ROW_COLUMN].to_numpy(), report.max_examples)
    invalid: dict[str, np.ndarray] = {}
    if PATH_COLUMN in frame:
        invalid[PATH_COLUMN] = frame[PATH_COLUMN].isna().to_numpy()
        cells.report(report, frame[PATH_COLUMN], invalid[PATH_COLUMN], BLANK_PATH, "a path to an image")
    for column, (allowed, blank_ok, reason) in _CATEGORY_RULES.items():
        if column in frame and column in schema.metadata_columns:
            invalid[column] = _invalid_categories(frame[column], allowed, blank_ok)
            cells.report(report, frame[column], invalid[column], reason, _expected_text(allowed, blank_ok))
    if AGE_COLUMN in frame and AGE_COLUMN in schema.metadata_columns:
        not_numbers, raw = _as_numbers(frame, AGE_COLUMN)
        invalid[AGE_COLUMN] = not_numbers | (frame[AGE_COLUMN].to_numpy() < 0)
        cells.report(report, raw, invalid[AGE_COLUMN], BAD_AGE, "a number of years >= 0 or blank")
    label_examples, label_count = [], 0
    for column in schema.observations:
        if column in frame:
            not_numbers, raw = _as_numbers(frame, column)
            invalid[column] = not_numbers | _invalid_labels(frame[column].to_numpy())
            label_count += int(invalid[column].sum())
            label_examples += cells.examples(raw, invalid[column], BAD_LABEL, _LABEL_EXPECTED)
    report.add(BAD_LABEL, label_count, sorted(label_examples, key=lambda e: e.row))
    return invalid


@dataclass(frozen=True)
class _CellProblems:
    """Formats problems of single cells; only the first ``max_examples`` per check become messages."""

    csv_name: str
    rows: np.ndarray  # file row of each frame row
    max_examples: int

    def examples(self, values: pd.Series, invalid: np.ndarray, reason: str, expected: str) -> list[BadInput]:
        examples = []
        for i in np.flatnonzero(invalid)[: self.max_examples]:
            row, got = int(self.rows[i]), _shown(values.iloc[i])
            message = f'{self.csv_name} row {row}, column "{values.name}": got {got}; expected {expected}'
            examples.append(BadInput(reason, message, row=row, column=str(values.name)))
        return examples

    def report(
        self, report: BadInputReport, values: pd.Series, invalid: np.ndarray, reason: str, expected: str
    ) -> None:
        report.add(reason, int(invalid.sum()), self.examples(values, invalid, reason, expected))


def _as_numbers(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, pd.Series]:
    """Make ``frame[column]`` float32 (it may have been read as text) -> (non-number cells, values as read)."""
    values = frame[column]
    if values.dtype == np.float32:
        return np.zeros(len(values), dtype=bool), values
    frame[column] = numbers = pd.to_numeric(values, errors="coerce").astype(np.float32)
    return (numbers.isna() & values.notna()).to_numpy(), values


def _invalid_labels(values: np.ndarray) -> np.ndarray:
    allowed = np.isnan(values)
    for value in ALLOWED_LABEL_VALUES:
        allowed |= values == value
    return ~allowed


def _invalid_categories(values: pd.Series, allowed: tuple[str, ...], blank_ok: bool) -> np.ndarray:
    blank = values.isna().to_numpy()
    known = values.isin(allowed).to_numpy()
    return ~known & ~blank if blank_ok else ~known


def _expected_text(allowed: tuple[str, ...], blank_ok: bool) -> str:
    options = list(allowed) + (["blank"] if blank_ok else [])
    return ", ".join(options[:-1]) + f" or {options[-1]}"


def _shown(value: Any) -> str:
    """A cell as the message shows it: blank, a number as the file writes it (2.0), or quoted text."""
    if pd.isna(value):
        return "blank"
    try:
        return str(np.float32(value))
    except ValueError:
        return f'"{value}"'


def _skip_bad_rows(checked: CheckedCsv) -> pd.DataFrame:
    """The rows without problems; counts the bad ones and the malformed ones the reader left out as skipped."""
    checked.report.rows_skipped += int(checked.bad_rows.sum()) + checked.report.counts.get(MALFORMED_ROW, 0)
    return _drop_rows(checked.frame, checked.bad_rows)


def _drop_rows(frame: pd.DataFrame, drop: np.ndarray) -> pd.DataFrame:
    return frame[~drop].reset_index(drop=True) if drop.any() else frame


# ----------------------------------------------------------------------------------------------
# Image root and files


@dataclass(frozen=True)
class ImageRoot:
    """Where the CSV's Paths point: ``folder / Path``, or ``folder / Path-without-its-first-folder``.

    The second form is a root that is the dataset folder itself (``.../CheXpert-v1.0-small``,
    whatever it is named), while CheXpert's Paths start with ``CheXpert-v1.0-small/``.
    """

    folder: Path
    strips_first_folder: bool = False

    def resolve(self, paths: pd.Series) -> pd.Series:
        """CSV Paths -> absolute image file names (absolute Paths are kept; blanks stay blank)."""
        relative = paths.str.replace(r"^[^/]*/", "", n=1, regex=True) if self.strips_first_folder else paths
        joined = (str(self.folder) + os.sep) + relative.astype("str")
        return joined.where(~paths.str.startswith("/").fillna(False), paths).astype("str")


def resolve_image_root(
    csv_path: str | os.PathLike, root: str | os.PathLike | None, paths: pd.Series | Sequence[str]
) -> ImageRoot:
    """Decide where Paths resolve: ``root`` (default: the CSV's folder) as the dataset's parent or the dataset itself.

    The first non-blank Paths are tried both ways and the way that finds more files wins; if none
    is found, a root named like the Paths' first folder is taken as the dataset folder.
    """
    folder = Path(root if root is not None else Path(csv_path).parent).expanduser().absolute()
    probe = [p for p in pd.Series(paths).dropna().head(_IMAGE_PROBE_ROWS) if p]
    as_parent = sum(os.path.isfile(folder / p) for p in probe)
    as_dataset = sum(os.path.isfile(folder / _without_first_folder(p)) for p in probe)
    if as_parent == as_dataset and probe:  # no evidence either way: go by the folder's name
        return ImageRoot(folder, strips_first_folder="/" in probe[0] and folder.name == probe[0].split("/", 1)[0])
    return ImageRoot(folder, strips_first_folder=as_dataset > as_parent)


def _without_first_folder(path: str) -> str:
    return path.split("/", 1)[1] if "/" in path else path


def find_missing_images(image_paths: pd.Series) -> np.ndarray:
    """Boolean mask of non-blank image files that do not exist (one stat per file, no decoding)."""
    names = image_paths.fillna("").tolist()
    exists = np.fromiter(map(os.path.isfile, names), dtype=bool, count=len(names))
    return ~exists & image_paths.notna().to_numpy()


def _report_missing_images(
    name: str, frame: pd.DataFrame, missing: np.ndarray, max_examples: int, report: BadInputReport
) -> None:
    examples = [
        BadInput(
            MISSING_IMAGE,
            f'{name} row {row}, column "{PATH_COLUMN}": image file {file} does not exist',
            row=int(row),
            column=PATH_COLUMN,
            file=file,
        )
        for row, file in frame.loc[missing, [CSV_ROW_COLUMN, IMAGE_PATH_COLUMN]].head(max_examples).itertuples(False)
    ]
    report.add(MISSING_IMAGE, int(missing.sum()), examples)


def _report_wrong_root(root: ImageRoot, n_images: int, report: BadInputReport) -> None:
    """The root does not exist, or not one image is under it: almost surely data.root is wrong."""
    if root.folder.is_dir():
        message = f"none of the {n_images:,} image files is under the image root {root.folder}"
    else:
        message = f"image root {root.folder} does not exist"
    report.add(WRONG_ROOT, 1, [BadInput(WRONG_ROOT, message, file=str(root.folder))])


# ----------------------------------------------------------------------------------------------
# Images


def load_image(source: str | os.PathLike | bytes, image_size_px: int, resize_mode: str = "pad") -> np.ndarray:
    """An image file or its bytes -> grayscale uint8 array (S, S), S = ``image_size_px``.

    Aspect-preserving: "pad" fits the long side and pads the short one with black, centred;
    "crop" fits the short side and keeps the centre. Never flips or crops at random; EXIF
    orientation is not applied (pixels as stored). Raises FileNotFoundError for a missing file,
    UndecodableImageError naming it otherwise.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode: got {resize_mode!r}; expected one of {RESIZE_MODES}")
    name = f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if image.format == "JPEG":
                # Decode at 1/2..1/8 scale in the DCT when that still covers S (both sides >= S).
                image.draft("L", (image_size_px, image_size_px))
            gray = _to_grayscale(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {name} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UndecodableImageError(f"cannot decode image {name}: {error}") from None
    return _resize_square(gray, image_size_px, resize_mode)


def _to_grayscale(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> mode L (8-bit gray)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_rescale_to_uint8(np.asarray(image)))
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        # Transparent means no signal: composite over black, the colour of padding.
        gray_alpha = np.asarray(image.convert("LA"), dtype=np.uint16)  # (H, W, 2)
        return Image.fromarray(((gray_alpha[..., 0] * gray_alpha[..., 1] + 127) // 255).astype(np.uint8))
    return image.convert("L")


def _rescale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """16/32-bit or float pixels -> uint8 by the image's own min..max.

    Not /257: medical 16-bit files usually hold 10-14 significant bits, so a fixed /257 turns a
    12-bit radiograph nearly black (0..16); and radiograph pixel values have no absolute scale
    across devices and exposures, so a per-image window loses nothing a fixed divisor would keep.
    """
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    if not high > low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


def _resize_square(gray: Image.Image, side_px: int, resize_mode: str) -> np.ndarray:
    """Mode-L image -> (S, S) uint8, aspect kept. Bilinear with Pillow's antialiasing, as diffusers'
    training scripts resize (torchvision ``Resize`` default)."""
    width, height = gray.size
    if resize_mode == "crop":
        short = min(width, height)
        left, top = (width - short) / 2, (height - short) / 2
        box = (left, top, left + short, top + short)
        return np.array(gray.resize((side_px, side_px), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
    scale = side_px / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = np.zeros((side_px, side_px), dtype=np.uint8)  # (S, S), black padding
    x0, y0 = (side_px - new_width) // 2, (side_px - new_height) // 2
    canvas[y0 : y0 + new_height, x0 : x0 + new_width] = np.asarray(
        gray.resize((new_width, new_height), Image.Resampling.BILINEAR)
    )
    return canvas


def _load_row_image(
    image_path: str, csv_row: int, csv_name: str, image_size_px: int, resize_mode: str
) -> tuple[np.ndarray | None, BadInput | None]:
    """Decode one row's image -> (pixels, None), or (None, problem) when it is missing or undecodable."""
    try:
        return load_image(image_path, image_size_px, resize_mode), None
    except FileNotFoundError:
        message = f'{csv_name} row {csv_row}, column "{PATH_COLUMN}": image file {image_path} does not exist'
        return None, BadInput(MISSING_IMAGE, message, row=csv_row, column=PATH_COLUMN, file=image_path)
    except UndecodableImageError as error:
        message = f"{csv_name} row {csv_row}: {error}"
        return None, BadInput(UNDECODABLE_IMAGE, message, row=csv_row, column=PATH_COLUMN, file=image_path)


def _raise_problem(problem: BadInput) -> None:
    if problem.reason == MISSING_IMAGE:
        raise FileNotFoundError(problem.message)
    raise UndecodableImageError(problem.message)


# ----------------------------------------------------------------------------------------------
# Filters


def select_rows(
    frame: pd.DataFrame,
    *,
    views: Sequence[str] | None = None,
    projections: Sequence[str] | None = None,
    positive_for: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Rows with a view in ``views``, a projection in ``projections`` and positive (1.0) for at least
    one of ``positive_for``; None means no filter. A projection filter drops laterals (AP/PA blank)."""
    keep = np.ones(len(frame), dtype=bool)
    if views is not None and set(views) != set(VIEWS):
        keep &= frame[_needed_column(frame, VIEW_COLUMN, "views")].isin(list(views)).to_numpy()
    if projections is not None:
        keep &= frame[_needed_column(frame, PROJECTION_COLUMN, "projections")].isin(list(projections)).to_numpy()
    if positive_for:
        missing = [label for label in positive_for if label not in frame.columns]
        if missing:
            raise ValueError(f"positive_for: unknown labels {missing}; this frame has columns {list(frame.columns)}")
        keep &= (frame[list(positive_for)].to_numpy() == POSITIVE).any(axis=1)
    return frame if keep.all() else frame[keep].reset_index(drop=True)


def _needed_column(frame: pd.DataFrame, column: str, option: str) -> str:
    if column not in frame.columns:
        raise ValueError(f'{option}: this dataset has no "{column}" column to filter on; leave {option} unset')
    return column


# ----------------------------------------------------------------------------------------------
# The loaded dataset and its pandas, Ray and torch forms


@dataclass
class LabelledImages:
    """A validated, filtered dataset: one row per image with its labels and resolved ``image_path``."""

    frame: pd.DataFrame
    root: ImageRoot
    observations: tuple[str, ...]
    report: BadInputReport
    cfg: DataConfig
    _ledger: Any = field(default=None, repr=False)

    @property
    def csv_name(self) -> str:
        return Path(self.report.source).name

    def targets_and_mask(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, K) float32 targets and loss mask under ``cfg.uncertainty_policy``, K = len(observations)."""
        raw = self.frame[list(self.observations)].to_numpy(dtype=np.float32)
        return apply_uncertainty_policy(raw, self.cfg.uncertainty_policy)

    def to_ray_dataset(self, rows_per_block: int = 256) -> ray.data.Dataset:
        """A lazy Ray Dataset: rows carry ``image`` (S, S) uint8, ``targets``/``mask`` (K,) float32 and the metadata.

        Images are decoded inside Ray tasks. Uses the caller's Ray (or Ray's auto-init). With
        ``skip_bad``, images that fail to decode are dropped and counted: see :meth:`decode_skips`.
        """
        import ray

        if self.cfg.skip_bad and self._ledger is None:
            self._ledger = ray.remote(num_cpus=0)(_DecodeSkipLedger).remote(self.report.source)
        # Blocks of rows_per_block so decoding spreads over tasks. Not from_pandas(override_num_blocks=...):
        # with numpy 2.4 its np.array_split returns ndarrays, not frames, and Ray 2.60 crashes.
        frame = _plain_columns(self.frame)
        blocks = [frame.iloc[start : start + rows_per_block] for start in range(0, len(frame), rows_per_block)]
        return ray.data.from_pandas(blocks).map_batches(
            _decode_batch,
            batch_format="numpy",
            batch_size=rows_per_block,
            fn_kwargs={
                "image_size_px": self.cfg.image_size_px,
                "resize_mode": self.cfg.resize_mode,
                "observations": self.observations,
                "uncertainty_policy": str(self.cfg.uncertainty_policy),
                "csv_name": self.csv_name,
                "ledger": self._ledger,
            },
        )

    def decode_skips(self) -> BadInputReport:
        """Images skipped while the Ray Dataset decoded them (``skip_bad``), counted per reason."""
        if self._ledger is None:
            return BadInputReport(source=self.report.source)
        import ray

        return ray.get(self._ledger.report.remote())

    def to_torch_dataset(self) -> LabelledImageDataset:
        return LabelledImageDataset(self)


def _plain_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Categories -> text: Arrow blocks with different dictionaries do not always concatenate."""
    categories = [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)]
    return frame.astype({c: "str" for c in categories}) if categories else frame


class _DecodeSkipLedger:
    """A Ray actor counting images the decode tasks skipped, so no skip is silent.

    Keyed by CSV row: a dataset consumed twice (or a retried task) counts each image once.
    """

    def __init__(self, source: str) -> None:
        self._problems: dict[int | None, BadInput] = {}
        self._source = source

    def add(self, problems: list[BadInput]) -> None:
        for problem in problems:
            self._problems.setdefault(problem.row, problem)

    def report(self) -> BadInputReport:
        report = BadInputReport(source=self._source)
        for problem in sorted(self._problems.values(), key=lambda p: p.row or 0):
            report.add(problem.reason, 1, [problem])
        report.rows_skipped = len(self._problems)
        return report


def _decode_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size_px: int,
    resize_mode: str,
    observations: tuple[str, ...],
    uncertainty_policy: str,
    csv_name: str,
    ledger: Any,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: decode each row's image, add targets and mask; skip bad images when ``ledger`` is set."""
    images, problems = [], []
    keep = np.ones(len(batch[IMAGE_PATH_COLUMN]), dtype=bool)
    for i, (image_path, csv_row) in enumerate(zip(batch[IMAGE_PATH_COLUMN], batch[CSV_ROW_COLUMN], strict=True)):
        pixels, problem = _load_row_image(str(image_path), int(csv_row), csv_name, image_size_px, resize_mode)
        if problem is None:
            images.append(pixels)
            continue
        if ledger is None:
            _raise_problem(problem)
        logger.warning("skipping %s", problem.message)
        problems.append(problem)
        keep[i] = False
    if problems:
        import ray

        ray.get(ledger.add.remote(problems))  # wait, so the count is complete once the dataset is consumed
    out = {column: values[keep] for column, values in batch.items()}
    raw = np.stack([out[o].astype(np.float32) for o in observations], axis=1)  # (B, K)
    out["targets"], out["mask"] = apply_uncertainty_policy(raw, uncertainty_policy)
    out["image"] = np.stack(images) if images else np.zeros((0, image_size_px, image_size_px), np.uint8)  # (B, S, S)
    return out


class LabelledImageDataset(torch.utils.data.Dataset):
    """Map-style torch dataset over :class:`LabelledImages`.

    Item i -> {"image": float32 (1, S, S) in [0, 1], "targets": float32 (K,), "mask": float32 (K,),
    "path": the CSV's Path}. With ``skip_bad`` an undecodable image gives None (use
    :func:`collate_skipping_bad`) and is counted in ``self.report`` of the process that loaded it.
    """

    def __init__(self, images: LabelledImages) -> None:
        frame = images.frame
        # Fixed-width numpy text, not Python lists: DataLoader workers would copy lists on read (refcounts).
        self.image_paths = frame[IMAGE_PATH_COLUMN].to_numpy(dtype=str)
        self.paths = frame[PATH_COLUMN].to_numpy(dtype=str)
        self.csv_rows = frame[CSV_ROW_COLUMN].to_numpy()
        self.targets, self.mask = images.targets_and_mask()
        self.image_size_px = images.cfg.image_size_px
        self.resize_mode = images.cfg.resize_mode
        self.skip_bad = images.cfg.skip_bad
        self.csv_name = images.csv_name
        self.report = BadInputReport(source=images.report.source)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        pixels, problem = _load_row_image(
            str(self.image_paths[index]), int(self.csv_rows[index]), self.csv_name, self.image_size_px, self.resize_mode
        )
        if problem is not None:
            if not self.skip_bad:
                _raise_problem(problem)
            logger.warning("skipping %s", problem.message)
            self.report.add(problem.reason, 1, [problem])
            self.report.rows_skipped += 1
            return None
        return {
            "image": torch.from_numpy(pixels).unsqueeze(0).float().div_(255.0),  # (1, S, S) in [0, 1]
            "targets": torch.from_numpy(self.targets[index]),
            "mask": torch.from_numpy(self.mask[index]),
            "path": str(self.paths[index]),
        }


def collate_skipping_bad(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` that leaves out items a ``skip_bad`` dataset returned as None."""
    return torch.utils.data.default_collate([item for item in items if item is not None])


def label_schema(cfg: DataConfig) -> LabelSchema:
    """The schema ``cfg`` describes: CheXpert, or Path + ``cfg.label_columns`` for any other labelled set."""
    if cfg.label_columns is None:
        return CHEXPERT
    return LabelSchema("custom", tuple(cfg.label_columns))


def load_dataset(
    cfg: DataConfig,
    schema: LabelSchema | None = None,
    check_files: bool = True,
    positive_for: Sequence[str] | None = None,
) -> LabelledImages:
    """Read, validate and filter the dataset ``cfg`` names -> :class:`LabelledImages`.

    Checks the whole CSV, then that each kept row's image file exists (``check_files``); raises
    once with every problem, or with ``cfg.skip_bad`` drops bad rows and counts them in ``.report``.
    Images are not decoded here.
    """
    if cfg.csv is None:
        raise ValueError("data.csv is not set: point it at a CheXpert-style CSV (write the phantom's first)")
    schema = schema or label_schema(cfg)
    try:
        observations = schema.select(cfg.observations or schema.observations).observations
    except ValueError as error:
        raise ValueError(f"data.observations: {error}") from None
    checked = check_labels_csv(cfg.csv, schema)
    if checked.report.has_fatal:  # wrong columns: filters and file checks cannot run
        checked.report.raise_if_problems(cfg.skip_bad)
    frame = _skip_bad_rows(checked) if cfg.skip_bad else checked.frame
    frame = frame[[*schema.metadata_columns, *observations, CSV_ROW_COLUMN]]
    frame = select_rows(frame, views=cfg.views, projections=cfg.projections, positive_for=positive_for)
    root = resolve_image_root(cfg.csv, cfg.root, frame[PATH_COLUMN])
    frame = frame.assign(**{IMAGE_PATH_COLUMN: root.resolve(frame[PATH_COLUMN])})
    missing = _check_files(checked.report, frame, root) if check_files else np.zeros(len(frame), bool)
    checked.report.raise_if_problems(cfg.skip_bad)
    checked.report.rows_skipped += int(missing.sum())
    frame = _drop_rows(frame, missing)
    if frame.empty:
        raise ValueError(f"{cfg.csv}: no rows left after filters ({_filters_text(cfg, positive_for)}) and skips")
    return LabelledImages(frame, root, observations, checked.report, cfg)


def _check_files(report: BadInputReport, frame: pd.DataFrame, root: ImageRoot) -> np.ndarray:
    """Report a wrong root (absent, or holding none of the images) and each missing image -> rows missing theirs."""
    if not root.folder.is_dir():
        _report_wrong_root(root, len(frame), report)
        return np.ones(len(frame), dtype=bool)
    missing = find_missing_images(frame[IMAGE_PATH_COLUMN])
    if len(frame) and missing.all():
        _report_wrong_root(root, len(frame), report)
    _report_missing_images(Path(report.source).name, frame, missing, report.max_examples, report)
    return missing


def _filters_text(cfg: DataConfig, positive_for: Sequence[str] | None) -> str:
    return f"views={cfg.views}, projections={cfg.projections}, positive_for={list(positive_for or [])}"


# ----------------------------------------------------------------------------------------------
# Inspection: everything about a dataset at once, without raising on bad rows or files


@dataclass
class DatasetInspection:
    """What `medsd data inspect` shows: counts, summaries and every problem found."""

    csv: str
    schema: str
    root: str | None
    strips_first_folder: bool
    rows: int  # parsed rows; malformed rows are not among them
    malformed_rows: int
    images: dict[str, int] | None  # checked, found, missing, undecodable; None when images were not checked
    labels: dict[str, dict[str, int]]  # observation -> positive, negative, uncertain, blank, invalid
    views: dict[str, int]
    projections: dict[str, int]
    sexes: dict[str, int]
    age: dict[str, float | int | None]
    problems: BadInputReport

    @property
    def has_errors(self) -> bool:
        return self.problems.has_problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (plain ints, floats, None)."""
        out = {k: v for k, v in self.__dict__.items() if k != "problems"}
        out["problems"] = self.problems.to_dict()
        out["has_errors"] = self.has_errors
        return out

    def to_text(self) -> str:
        """A human table of the counts and problems."""
        malformed = f" (+{self.malformed_rows:,} malformed, not counted below)" if self.malformed_rows else ""
        lines = [f"CSV       {self.csv}  (schema {self.schema})", f"Rows      {self.rows:,}{malformed}"]
        if self.root is not None:
            how = "the dataset folder itself" if self.strips_first_folder else "Paths are relative to it"
            lines.append(f"Root      {self.root}  ({how})")
        if self.images is None:
            lines.append("Images    not checked")
        else:
            lines.append("Images    " + ", ".join(f"{v:,} {k}" for k, v in self.images.items()))
        for title, counts in (("Views", self.views), ("AP/PA", self.projections), ("Sex", self.sexes)):
            if counts:
                lines.append(f"{title:<10}" + " | ".join(f"{k} {v:,}" for k, v in counts.items()))
        if self.age:
            lines.append("Age       " + ", ".join(f"{k} {_number_text(v)}" for k, v in self.age.items()))
        lines += ["", _label_table(self.labels), ""]
        if self.has_errors:
            lines += [self.problems.summary(), self.problems.to_text()]
        else:
            lines.append("Problems  none")
        return "\n".join(lines)


def _number_text(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _label_table(labels: dict[str, dict[str, int]]) -> str:
    kinds = ("positive", "negative", "uncertain", "blank", "invalid")
    width = max([len("Label"), *map(len, labels)]) + 2
    rows = [f"{'Label':<{width}}" + "".join(f"{k:>11}" for k in kinds)]
    rows += [f"{label:<{width}}" + "".join(f"{c[k]:>11,}" for k in kinds) for label, c in labels.items()]
    return "\n".join(rows)


def inspect_dataset(
    csv_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    check_images: bool = True,
    schema: LabelSchema = CHEXPERT,
) -> DatasetInspection:
    """Count everything in a dataset and list every problem, without raising on them.

    ``check_images`` checks that each image exists and decodes (threads, with a progress bar);
    False skips the image folder entirely. Raises only if the CSV cannot be read at all.
    """
    checked = check_labels_csv(csv_path, schema)
    frame, report = checked.frame, checked.report
    image_root, images = None, None
    if PATH_COLUMN in frame:
        image_root = resolve_image_root(csv_path, root, frame[PATH_COLUMN])
        if check_images:
            frame = frame.assign(**{IMAGE_PATH_COLUMN: image_root.resolve(frame[PATH_COLUMN])})
            images = _inspect_images(frame, image_root, report)
    return DatasetInspection(
        csv=str(csv_path),
        schema=schema.name,
        root=str(image_root.folder) if image_root else None,
        strips_first_folder=bool(image_root and image_root.strips_first_folder),
        rows=len(frame),
        malformed_rows=report.counts.get(MALFORMED_ROW, 0),
        images=images,
        labels={o: _label_counts(frame[o], checked.invalid_cells[o]) for o in schema.observations if o in frame},
        views=_value_counts(frame, VIEW_COLUMN, schema),
        projections=_value_counts(frame, PROJECTION_COLUMN, schema),
        sexes=_value_counts(frame, SEX_COLUMN, schema),
        age=_age_summary(frame, checked.invalid_cells.get(AGE_COLUMN), schema),
        problems=report,
    )


def _inspect_images(frame: pd.DataFrame, root: ImageRoot, report: BadInputReport) -> dict[str, int]:
    """Check existence then decode each existing image; problems go into ``report``."""
    checked = int(frame[IMAGE_PATH_COLUMN].notna().sum())
    missing = _check_files(report, frame, root)
    present = frame.loc[~missing & frame[IMAGE_PATH_COLUMN].notna().to_numpy(), [IMAGE_PATH_COLUMN, CSV_ROW_COLUMN]]
    undecodable = _find_undecodable(present, Path(report.source).name)
    report.add(UNDECODABLE_IMAGE, len(undecodable), undecodable)
    n_missing = int(missing.sum())
    return {"checked": checked, "found": checked - n_missing, "missing": n_missing, "undecodable": len(undecodable)}


def _find_undecodable(present: pd.DataFrame, csv_name: str) -> list[BadInput]:
    """Decode every image (threads: Pillow releases the GIL while decoding) -> problems, in row order."""

    def problems_in(chunk: pd.DataFrame) -> list[BadInput]:
        results = (
            _load_row_image(image_path, int(row), csv_name, _INSPECT_IMAGE_SIDE_PX, "pad")[1]
            for image_path, row in chunk.itertuples(index=False, name=None)
        )
        return [problem for problem in results if problem is not None]

    chunks = [present.iloc[start : start + 256] for start in range(0, len(present), 256)]
    problems: list[BadInput] = []
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
        tqdm(total=len(present), desc="decoding images", unit="img", disable=None) as progress,
    ):
        for chunk, found in zip(chunks, pool.map(problems_in, chunks), strict=True):
            problems += found
            progress.update(len(chunk))
    return problems


def _label_counts(values: pd.Series, invalid: np.ndarray) -> dict[str, int]:
    numbers = values.to_numpy(dtype=np.float32)
    valid = ~invalid
    return {
        "positive": int((numbers[valid] == POSITIVE).sum()),
        "negative": int((numbers[valid] == NEGATIVE).sum()),
        "uncertain": int((numbers[valid] == UNCERTAIN).sum()),
        "blank": int(np.isnan(numbers[valid]).sum()),
        "invalid": int(invalid.sum()),
    }


def _value_counts(frame: pd.DataFrame, column: str, schema: LabelSchema) -> dict[str, int]:
    if column not in frame or column not in schema.metadata_columns:
        return {}
    counts = frame[column].value_counts(dropna=False)
    return {("blank" if pd.isna(k) else str(k)): int(v) for k, v in counts.items() if v > 0}


def _age_summary(frame: pd.DataFrame, invalid: np.ndarray | None, schema: LabelSchema) -> dict[str, float | int | None]:
    if AGE_COLUMN not in frame or AGE_COLUMN not in schema.metadata_columns:
        return {}
    ages = frame[AGE_COLUMN].to_numpy(dtype=np.float32)[~invalid]
    known = ages[~np.isnan(ages)]
    summary: dict[str, float | int | None] = {"min": None, "median": None, "max": None}
    if known.size:
        summary = {"min": float(known.min()), "median": float(np.median(known)), "max": float(known.max())}
    summary["missing"] = int(np.isnan(ages).sum())
    summary["invalid"] = int(invalid.sum())
    return summary
