"""Label schemas (CheXpert and any other labelled image set) and uncertainty policies.

A schema is data: an ordered list of observation columns plus the metadata columns a CSV
carries. CheXpert is one instance; an eye dataset with ``RG``/``NRG`` is another, built from
configuration (``LabelSchema(name="eye", observations=("RG", "NRG"))``), not new code.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np

# Column names of a CheXpert-style CSV.
PATH_COLUMN = "Path"
SEX_COLUMN = "Sex"
AGE_COLUMN = "Age"
VIEW_COLUMN = "Frontal/Lateral"
PROJECTION_COLUMN = "AP/PA"
CHEXPERT_METADATA_COLUMNS = (PATH_COLUMN, SEX_COLUMN, AGE_COLUMN, VIEW_COLUMN, PROJECTION_COLUMN)

# The 14 observations in the order CheXpert's train.csv writes them (Irvin et al. 2019, Table 1).
CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NO_FINDING = "No Finding"
# The five observations of the CheXpert competition, alphabetical as in the paper.
COMPETITION_FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

VIEWS = ("Frontal", "Lateral")
# CheXpert's AP/PA column also holds LL/RL on a few frontal rows, and is blank on laterals.
PROJECTIONS = ("AP", "PA", "LL", "RL")
SEXES = ("Male", "Female", "Unknown")

# Raw label values as CheXpert writes them; blank (NaN) means "not mentioned in the report".
POSITIVE = 1.0
NEGATIVE = 0.0
UNCERTAIN = -1.0
ALLOWED_LABEL_VALUES = (POSITIVE, NEGATIVE, UNCERTAIN)


@dataclass(frozen=True)
class LabelSchema:
    """An ordered set of observation columns and the metadata columns that come with them."""

    name: str
    observations: tuple[str, ...]
    metadata_columns: tuple[str, ...] = (PATH_COLUMN,)

    def __post_init__(self) -> None:
        if not self.observations:
            raise ValueError(f"label schema {self.name!r}: needs at least one observation")
        duplicates = sorted({o for o in self.observations if self.observations.count(o) > 1})
        if duplicates:
            raise ValueError(f"label schema {self.name!r}: duplicate observations {duplicates}")
        if PATH_COLUMN not in self.metadata_columns:
            raise ValueError(f"label schema {self.name!r}: metadata columns must include {PATH_COLUMN!r}")

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a CSV of this schema has, metadata first."""
        return self.metadata_columns + self.observations

    def index(self, observation: str) -> int:
        """Position of ``observation`` in the schema; ValueError naming the valid ones if absent."""
        if observation not in self.observations:
            raise ValueError(
                f"unknown label {observation!r} for schema {self.name!r}; "
                f"expected one of: {', '.join(self.observations)}"
            )
        return self.observations.index(observation)

    def select(self, observations: list[str] | tuple[str, ...]) -> LabelSchema:
        """A schema restricted to ``observations`` (in the given order), same metadata columns."""
        for o in observations:
            self.index(o)
        return LabelSchema(self.name, tuple(observations), self.metadata_columns)


CHEXPERT = LabelSchema("chexpert", CHEXPERT_OBSERVATIONS, CHEXPERT_METADATA_COLUMNS)


class UncertaintyPolicy(enum.StrEnum):
    """What an uncertain (-1) label means for training (CheXpert paper, section 4)."""

    IGNORE = "U-Ignore"  # masked out of the loss
    ZEROS = "U-Zeros"  # read as negative
    ONES = "U-Ones"  # read as positive


def apply_uncertainty_policy(raw: np.ndarray, policy: UncertaintyPolicy | str) -> tuple[np.ndarray, np.ndarray]:
    """Raw label values (1, 0, -1, NaN) -> (targets, mask), both float32 of the same shape.

    Blank (NaN, "not mentioned") is read as negative under every policy, as CheXpert baselines do.
    ``mask`` is 0 where a value must not contribute to a loss or metric (uncertain under U-Ignore).
    """
    policy = UncertaintyPolicy(policy)
    values = np.asarray(raw, dtype=np.float32)
    uncertain = values == UNCERTAIN
    targets = np.where(np.isnan(values), NEGATIVE, values)
    mask = np.ones_like(targets)
    if policy is UncertaintyPolicy.IGNORE:
        targets = np.where(uncertain, NEGATIVE, targets)
        mask = np.where(uncertain, 0.0, 1.0).astype(np.float32)
    elif policy is UncertaintyPolicy.ZEROS:
        targets = np.where(uncertain, NEGATIVE, targets)
    else:
        targets = np.where(uncertain, POSITIVE, targets)
    return targets.astype(np.float32), mask.astype(np.float32)


def label_slug(observation: str) -> str:
    """'Pleural Effusion' -> 'pleural-effusion': the folder and partition name of a label."""
    slug = re.sub(r"[^a-z0-9]+", "-", observation.lower()).strip("-")
    if not slug:
        raise ValueError(f"label {observation!r} has no letters or digits to name a folder by")
    return slug
