import math

import numpy as np
import pytest

from medsd.labels import (
    CHEXPERT,
    CHEXPERT_OBSERVATIONS,
    COMPETITION_FIVE,
    LabelSchema,
    UncertaintyPolicy,
    apply_uncertainty_policy,
    label_slug,
)


def test_chexpert_schema_order_matches_the_real_csv_header():
    header = (
        "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
        "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
        "Fracture,Support Devices"
    )
    assert ",".join(CHEXPERT.columns) == header
    assert len(CHEXPERT_OBSERVATIONS) == 14
    assert set(COMPETITION_FIVE) <= set(CHEXPERT_OBSERVATIONS)


RAW = np.array([1.0, 0.0, -1.0, math.nan], dtype=np.float32)


@pytest.mark.parametrize(
    ("policy", "targets", "mask"),
    [
        (UncertaintyPolicy.IGNORE, [1, 0, 0, 0], [1, 1, 0, 1]),
        (UncertaintyPolicy.ZEROS, [1, 0, 0, 0], [1, 1, 1, 1]),
        (UncertaintyPolicy.ONES, [1, 0, 1, 0], [1, 1, 1, 1]),
    ],
)
def test_uncertainty_policies(policy, targets, mask):
    got_targets, got_mask = apply_uncertainty_policy(RAW, policy)
    assert got_targets.dtype == np.float32 and got_mask.dtype == np.float32
    np.testing.assert_array_equal(got_targets, targets)
    np.testing.assert_array_equal(got_mask, mask)


def test_policy_accepts_its_paper_name_and_2d_arrays():
    raw = np.stack([RAW, RAW[::-1]])
    targets, mask = apply_uncertainty_policy(raw, "U-Ones")
    assert targets.shape == mask.shape == (2, 4)
    with pytest.raises(ValueError, match="U-Maybe"):
        apply_uncertainty_policy(raw, "U-Maybe")


def test_other_label_sets_are_configuration():
    eye = LabelSchema("eye", ("RG", "NRG"))
    assert eye.columns == ("Path", "RG", "NRG")
    assert eye.index("NRG") == 1
    with pytest.raises(ValueError, match="unknown label 'Edema'.*RG, NRG"):
        eye.index("Edema")
    with pytest.raises(ValueError, match="duplicate"):
        LabelSchema("bad", ("A", "A"))
    assert CHEXPERT.select(["Edema", "Cardiomegaly"]).observations == ("Edema", "Cardiomegaly")


def test_label_slug():
    assert label_slug("Pleural Effusion") == "pleural-effusion"
    assert label_slug("No Finding") == "no-finding"
    assert len({label_slug(o) for o in CHEXPERT_OBSERVATIONS}) == 14
    with pytest.raises(ValueError):
        label_slug("  ")
