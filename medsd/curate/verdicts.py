"""Which synthetic images the judge agrees with: an image is kept when, for every label the uncertainty
policy keeps, the judge's probability is at least the threshold where its row says present and below it
where its row says absent. A prompt the generator did not draw (or drew too much of) is set aside."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from medsd.labels import PATH_COLUMN

KEPT, REASON = "kept", "reason"


@dataclass(frozen=True)
class Verdicts:
    """Per image (N): kept or not, and why not; per image and label (N, L): the judge missed a sign the row
    names (``missed``) or saw one the row says is absent (``unwanted``)."""

    labels: tuple[str, ...]
    probabilities: np.ndarray
    missed: np.ndarray
    unwanted: np.ndarray
    threshold: float

    @property
    def kept(self) -> np.ndarray:
        return ~(self.missed | self.unwanted).any(axis=1)

    def reasons(self) -> list[str]:
        """'' for a kept image, else e.g. 'Atelectasis labelled present, judge 0.21; Edema labelled absent,
        judge 0.64'."""
        reasons = []
        for missed, unwanted, probabilities in zip(self.missed, self.unwanted, self.probabilities, strict=True):
            parts = [
                f"{label} labelled {'present' if miss else 'absent'}, judge {p:.2f}"
                for label, miss, extra, p in zip(self.labels, missed, unwanted, probabilities, strict=True)
                if miss or extra
            ]
            reasons.append("; ".join(parts))
        return reasons

    def rejected_per_label(self) -> dict[str, dict[str, int]]:
        """label -> how many images were set aside for it: sign missed, sign unwanted."""
        return {
            label: {"missed": int(self.missed[:, j].sum()), "unwanted": int(self.unwanted[:, j].sum())}
            for j, label in enumerate(self.labels)
        }

    def frame(self, paths: list[str]) -> pd.DataFrame:
        """curation.csv: every judged image with its verdict, reason and the judge's probability per label."""
        frame = pd.DataFrame({PATH_COLUMN: paths, KEPT: self.kept, REASON: self.reasons()})
        for j, label in enumerate(self.labels):
            frame[f"judge {label}"] = np.round(self.probabilities[:, j], 4)
        return frame


def judge_verdicts(
    targets: np.ndarray, mask: np.ndarray, probabilities: np.ndarray, labels: tuple[str, ...], threshold: float
) -> Verdicts:
    """Compare the rows' labels (``targets``/``mask`` under the uncertainty policy) with the judge's probabilities."""
    if not targets.shape == mask.shape == probabilities.shape or targets.shape[1] != len(labels):
        raise ValueError(
            f"targets, mask, probabilities: got shapes {targets.shape}, {mask.shape}, {probabilities.shape} "
            f"for {len(labels)} labels; expected the same (N, {len(labels)})"
        )
    checked = mask > 0
    missed = checked & (targets == 1) & (probabilities < threshold)
    unwanted = checked & (targets == 0) & (probabilities >= threshold)
    return Verdicts(tuple(labels), probabilities, missed, unwanted, threshold)
