"""An evaluation image set in memory: decoded pixels, targets and mask under the uncertainty policy, metadata.

Every set (real training, held-out test, each synthetic folder) is decoded once through medsd.data's Ray
Dataset, at one image size, then shared with the arm and metric tasks through Ray's object store.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medsd.config import DataConfig
from medsd.data import CSV_ROW_COLUMN, load_dataset
from medsd.labels import PATH_COLUMN, PROJECTION_COLUMN, VIEW_COLUMN
from medsd.prompts import prompt_for_labels

PROMPT = "prompt"  # what the image shows, as a prompt: the generator's own for synthetic images
GUIDANCE_SCALE = "guidance_scale"  # NaN for real images and for synthetic sets made outside medsd


@dataclass
class ImageSet:
    """One set of images with its labels, aligned row by row.

    ``images`` (N, S, S) uint8; ``targets``/``mask`` (N, L) float32 over ``labels``; ``frame`` holds Path,
    the raw label values, prompt and guidance_scale; ``skipped`` says what decoding left out (skip_bad).
    """

    name: str
    images: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    frame: pd.DataFrame
    labels: tuple[str, ...]
    skipped: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray, name: str | None = None) -> ImageSet:
        """The rows ``index`` (integer positions or a boolean mask), in that order."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index, dtype=np.int64)
        return ImageSet(
            name or self.name,
            self.images[index],
            self.targets[index],
            self.mask[index],
            self.frame.iloc[index].reset_index(drop=True),
            self.labels,
            self.skipped,
        )

    def sample(self, size: int, rng: np.random.Generator) -> ImageSet:
        """``size`` rows drawn without replacement by ``rng``, kept in their original order."""
        return self.subset(np.sort(rng.choice(len(self), size=size, replace=False)))

    def class_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives) per label among the entries the mask keeps, each (L,) int."""
        kept = self.mask > 0
        return (kept & (self.targets == 1)).sum(axis=0), (kept & (self.targets == 0)).sum(axis=0)

    @staticmethod
    def concatenate(name: str, sets: list[ImageSet]) -> ImageSet:
        """The rows of ``sets`` one after another (the same labels and image size)."""
        return ImageSet(
            name,
            np.concatenate([s.images for s in sets]),
            np.concatenate([s.targets for s in sets]),
            np.concatenate([s.mask for s in sets]),
            pd.concat([s.frame for s in sets], ignore_index=True),
            sets[0].labels,
            "; ".join(s.skipped for s in sets if s.skipped),
        )


def decode_image_set(name: str, cfg: DataConfig, labels: list[str]) -> ImageSet:
    """Read, check and decode the dataset ``cfg`` names (columns ``labels``) on the current Ray -> ImageSet.

    Problems raise once, prefixed with ``name`` (e.g. "test"), with every file, row and column the data
    layer found; with ``cfg.skip_bad`` the skips are counted in ``skipped``.
    """
    cfg = cfg.model_copy(update={"observations": list(labels)})
    try:
        labelled = load_dataset(cfg)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"{name}: {error}") from None
    dataset = labelled.to_ray_dataset()
    dataset.context.execution_options.preserve_order = True  # CSV order: a seed trains on the same sequence
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not batches or not sum(len(batch["image"]) for batch in batches):
        raise ValueError(f"{name}: {cfg.csv} has no decodable images ({labelled.decode_skips().summary()})")
    columns = [PATH_COLUMN, CSV_ROW_COLUMN, *labels] + [c for c in (VIEW_COLUMN, PROJECTION_COLUMN) if c in batches[0]]
    frame = pd.DataFrame({c: np.concatenate([batch[c] for batch in batches]) for c in columns})
    frame[PROMPT] = [
        prompt_for_labels(row, policy=cfg.uncertainty_policy, observations=labels, name_uncertain=cfg.name_uncertain)
        for row in frame.to_dict("records")
    ]
    frame[GUIDANCE_SCALE] = np.nan
    skips = labelled.report
    skips.merge(labelled.decode_skips())
    return ImageSet(
        name,
        np.concatenate([batch["image"] for batch in batches]),  # (N, S, S) uint8
        np.concatenate([batch["targets"] for batch in batches]),  # (N, L)
        np.concatenate([batch["mask"] for batch in batches]),  # (N, L)
        frame,
        tuple(labels),
        skips.summary() if skips.has_problems else "",
    )


@contextlib.contextmanager
def shared_arrays_readable() -> Iterator[None]:
    """Silence torch's warning on wrapping read-only numpy arrays: Ray's object store hands tasks read-only
    arrays, and the classifier only reads them (copying every set per task would double its memory)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        yield
