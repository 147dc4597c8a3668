"""medsd.train.card: the resolved config and model card every output carries."""

from __future__ import annotations

from medsd.config import TrainConfig, load_config
from medsd.train.card import CONFIG_FILE, RunFacts, write_model_card, write_resolved_config

FACTS = RunFacts(
    base_model="tiny (tiny-v1-phantom1)",
    base_model_hash="0123456789abcdef",
    data_csv="/data/train.csv",
    labels=("Cardiomegaly", "Edema"),
    n_instance=15,
    n_class=8,
    n_prompts=5,
    steps=30,
    final_loss=0.1234,
    placeholder_tokens={"Cardiomegaly": "<cardiomegaly>"},
)


def test_resolved_config_loads_back(tmp_path) -> None:
    cfg = load_config(TrainConfig, None, ["method=textual_inversion", "max_steps=7"])
    path = write_resolved_config(cfg, tmp_path)
    assert path.name == CONFIG_FILE
    assert load_config(TrainConfig, path) == cfg


def test_model_card_says_what_how_and_that_outputs_are_synthetic(tmp_path) -> None:
    cfg = load_config(
        TrainConfig,
        None,
        [
            "method=textual_inversion",
            "conditioning=instance",
            "labels=[Cardiomegaly]",
            "dreambooth.prior_preservation=false",
        ],
    )
    text = write_model_card(cfg, FACTS, tmp_path).read_text()
    for expected in (
        "textual_inversion (instance conditioning)",
        "`tiny (tiny-v1-phantom1)` (content hash 0123456789abcdef)",
        "`/data/train.csv`, 15 training images, plus 8 class images",
        "30 optimizer steps",
        "final loss 0.1234",
        "pipe.load_textual_inversion",
        "- Placeholder tokens:\n  - Cardiomegaly: `<cardiomegaly>`",
        "**Synthetic, not diagnostic.**",
    ):
        assert expected in text, expected
