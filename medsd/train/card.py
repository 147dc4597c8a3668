"""The files that let the next stage read a training output instead of being told again:
``train_config.yaml`` (the resolved config) and ``model_card.md``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from medsd.config import TrainConfig
from medsd.models import MODEL_CARD_FILE

CONFIG_FILE = "train_config.yaml"

HOW_TO_LOAD = {
    "dreambooth": '`StableDiffusionPipeline.from_pretrained("<this folder>")`, or `model.model: <this folder>`',
    "lora": '`pipe.load_lora_weights("<this folder>")` on the base model, or `model.adapters: [{name, path}]`',
    "textual_inversion": '`pipe.load_textual_inversion("<this folder>/<label-slug>")` per label on the base model, '
    "or `model.adapters: [{name, path}]`; prompts name a label by its token (placeholder_tokens.json)",
}


@dataclass(frozen=True)
class RunFacts:
    """What the model card reports besides the config."""

    base_model: str
    base_model_hash: str
    data_csv: str
    labels: tuple[str, ...]
    n_instance: int
    n_class: int
    n_prompts: int
    steps: int
    final_loss: float | None
    placeholder_tokens: dict[str, str]


def write_resolved_config(cfg: TrainConfig, folder: Path) -> Path:
    """``<folder>/train_config.yaml``: every field, defaults included, loadable with load_config(TrainConfig)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def write_model_card(cfg: TrainConfig, facts: RunFacts, folder: Path) -> Path:
    """``<folder>/model_card.md``: base model, data, method, steps, how to load, the synthetic-use warning."""
    tokens = "".join(f"\n  - {label}: `{token}`" for label, token in facts.placeholder_tokens.items())
    class_set = (
        f", plus {facts.n_class} class images ({cfg.dreambooth.class_source}, prior loss weight "
        f"{cfg.dreambooth.prior_loss_weight})"
        if facts.n_class
        else ""
    )
    loss = "n/a" if facts.final_loss is None else f"{facts.final_loss:.4f}"
    placeholder_lines = f"\n- Placeholder tokens:{tokens}" if tokens else ""
    written = datetime.now(UTC).isoformat(timespec="seconds")
    text = f"""# medsd fine-tuned Stable Diffusion: {cfg.method} ({cfg.conditioning} conditioning)

- Base model: `{facts.base_model}` (content hash {facts.base_model_hash}).
- Data: `{facts.data_csv}`, {facts.n_instance} training images{class_set}; labels: {", ".join(facts.labels)};
  uncertainty policy {cfg.data.uncertainty_policy}; {facts.n_prompts} distinct prompts;
  images {cfg.data.image_size_px} px.
- Method: {cfg.method}; train_text_encoder={cfg.train_text_encoder}; {facts.steps} optimizer steps of
  {cfg.batch_size} images x {max(1, cfg.scaling.num_workers)} workers x {cfg.optim.gradient_accumulation_steps}
  accumulation; learning rate {cfg.optim.learning_rate} ({cfg.optim.schedule}, {cfg.optim.warmup_steps} warmup);
  final loss {loss}.
- Load with {HOW_TO_LOAD[cfg.method]}.{placeholder_lines}
- Written {written}; the full resolved config is `{CONFIG_FILE}` beside this file.

**Synthetic, not diagnostic.** Images from this model are synthetic. They are for research and software
testing (e.g. augmenting classifier training) and must never be used for diagnosis or clinical decisions,
or presented as real patient images.
"""
    path = folder / MODEL_CARD_FILE
    path.write_text(text)
    return path
