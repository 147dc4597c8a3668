"""What each training image is paired with: its prompt and its loss weight.

Three ways (``TrainConfig.conditioning``):
- ``labels``: every selected image with the prompt of its own positive labels and view.
- ``instance``: classic DreamBooth: images positive for one label, prompted with an identifier, plus (prior
  preservation) a class set of real No Finding images or base-model images, prompted without it. Instance
  and class rows share one stream; a class row weighs ``prior_loss_weight * n_instance / n_class`` so the
  two sets contribute in the ratio the reference scripts' paired batches give.
- ``per_label``: one ``instance`` run per label, each into ``<out>/<label-slug>/``.
Textual inversion names each label by its placeholder token instead of its words. Every prompt is
formatted by :mod:`medsd.prompts`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medsd.config import DataConfig, TrainConfig
from medsd.data import LabelledImages, label_schema, load_dataset
from medsd.labels import NO_FINDING, PATH_COLUMN, VIEW_COLUMN, label_slug
from medsd.prompts import PromptParts, format_prompt, parse_prompt, prompt_for_labels
from medsd.train.batches import SAMPLE_ID

logger = logging.getLogger(__name__)

EMPTY_PROMPT = ""  # prompt 0 of every table: classifier-free guidance trains on it
PROMPT_INDEX = "prompt_index"
LOSS_WEIGHT = "loss_weight"
CLASS_IMAGES_CSV = "class_images.csv"
VALIDATION_VIEW = "Frontal"
VALIDATION_PROJECTION = "PA"


@dataclass(frozen=True)
class TrainingSet:
    """The rows one run trains on (``images.frame`` gains sample_id, prompt_index, loss_weight) and its prompts."""

    images: LabelledImages
    prompts: tuple[str, ...]  # prompt_index -> text; index 0 is the empty prompt
    labels: tuple[str, ...]  # the labels this run conditions on
    placeholder_tokens: dict[str, str]  # label -> token (textual inversion; empty otherwise)
    n_instance: int
    n_class: int

    @property
    def n_samples(self) -> int:
        return len(self.images.frame)


def trained_labels(cfg: TrainConfig, data: DataConfig) -> tuple[str, ...]:
    """``cfg.labels``, else the data's observations except No Finding (which is what a prompt says without them)."""
    if cfg.labels is not None:
        return tuple(cfg.labels)
    observations = data.observations or label_schema(data).observations
    return tuple(o for o in observations if o != NO_FINDING)


def placeholder_token(label: str) -> str:
    """The textual-inversion token of a label: 'Pleural Effusion' -> '<pleural-effusion>'."""
    return f"<{label_slug(label)}>"


def placeholder_vectors(token: str, num_vectors: int) -> list[str]:
    """The tokens one placeholder occupies, named as diffusers' load_textual_inversion names them."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_placeholders(prompt: str, placeholder_tokens: Sequence[str], num_vectors: int) -> str:
    """Spell each multi-vector placeholder as all its tokens, as diffusers' maybe_convert_prompt does at
    inference, so training sees the token sequence generation will feed the text encoder."""
    if num_vectors == 1:
        return prompt
    words = [" ".join(placeholder_vectors(w, num_vectors)) if w in placeholder_tokens else w for w in prompt.split(" ")]
    return " ".join(words)


def label_words(cfg: TrainConfig, labels: Sequence[str]) -> dict[str, str]:
    """How prompts name each label: its own name, or its placeholder token under textual inversion."""
    if cfg.method == "textual_inversion":
        return {label: placeholder_token(label) for label in labels}
    return {label: label for label in labels}


def labels_prompt(row: dict, cfg: TrainConfig, labels: Sequence[str], words: dict[str, str]) -> str:
    """The prompt of an image's own positive (and, if so configured, uncertain) labels among ``labels``, and view."""
    own = prompt_for_labels(
        row,
        policy=cfg.data.uncertainty_policy,
        observations=list(labels),
        include_view=cfg.include_view,
        name_uncertain=cfg.data.name_uncertain,
    )
    parts = parse_prompt(own, observations=list(labels))
    return format_prompt(
        dataclasses.replace(
            parts,
            findings=tuple(words[f] for f in parts.findings),
            uncertain=tuple(words[f] for f in parts.uncertain),
        )
    )


def instance_prompt(row: dict | None, cfg: TrainConfig, label: str, words: dict[str, str], identifier: bool) -> str:
    """'a sks frontal PA chest x-ray showing <label>': the instance label only, in the image's view
    (``row`` None: the validation view)."""
    if row is None:
        view, projection = (VALIDATION_VIEW, VALIDATION_PROJECTION) if cfg.include_view else (None, None)
    else:
        parts = parse_prompt(prompt_for_labels(row, observations=[], include_view=cfg.include_view), observations=[])
        view, projection = parts.view, parts.projection
    use_identifier = identifier and cfg.method != "textual_inversion"  # the placeholder already is the identifier
    return format_prompt(
        PromptParts((words[label],), view, projection, cfg.dreambooth.identifier if use_identifier else None)
    )


def build_training_set(cfg: TrainConfig, data: DataConfig, class_csv: Path | None = None) -> TrainingSet:
    """Load and validate the data of one run and pair every image with a prompt and a loss weight.

    ``class_csv``: the generated class set (conditioning=instance, class_source=generated).
    """
    labels = trained_labels(cfg, data)
    check_labels_in_data(labels, data, cfg)
    words = label_words(cfg, labels)
    if cfg.conditioning == "labels":
        images = load_dataset(data)
        prompts = [labels_prompt(row, cfg, labels, words) for row in _records(images)]
        weights = [1.0] * len(prompts)
        n_instance, n_class = len(prompts), 0
    else:
        (label,) = labels
        try:
            images = load_dataset(data, positive_for=[label])
        except ValueError as error:
            raise ValueError(f"labels: no instance images for {label!r}: {error}") from None
        prompts = [instance_prompt(row, cfg, label, words, identifier=True) for row in _records(images)]
        weights = [1.0] * len(prompts)
        n_instance, n_class = len(prompts), 0
        if uses_class_set(cfg):
            class_images, class_prompts = _class_set(cfg, data, label, words, class_csv)
            n_class = len(class_prompts)
            class_weight = cfg.dreambooth.prior_loss_weight * n_instance / n_class
            frame = pd.concat([images.frame, class_images.frame], ignore_index=True)
            images = dataclasses.replace(images, frame=frame)
            prompts += class_prompts
            weights += [class_weight] * n_class
    table = [EMPTY_PROMPT, *sorted(set(prompts) - {EMPTY_PROMPT})]
    index_of = {prompt: index for index, prompt in enumerate(table)}
    frame = images.frame.assign(
        **{
            SAMPLE_ID: np.arange(len(images.frame), dtype=np.int64),
            PROMPT_INDEX: np.array([index_of[p] for p in prompts], dtype=np.int64),
            LOSS_WEIGHT: np.array(weights, dtype=np.float32),
        }
    )
    tokens = {label: words[label] for label in labels} if cfg.method == "textual_inversion" else {}
    logger.info(
        "training set: %d instance + %d class images, %d distinct prompts (%s conditioning)",
        n_instance,
        n_class,
        len(table),
        cfg.conditioning,
    )
    return TrainingSet(dataclasses.replace(images, frame=frame), tuple(table), labels, tokens, n_instance, n_class)


def uses_class_set(cfg: TrainConfig) -> bool:
    """Whether a run trains on a class set too (DreamBooth prior preservation)."""
    return cfg.conditioning != "labels" and cfg.dreambooth.prior_preservation


def check_labels_in_data(labels: Sequence[str], data: DataConfig, cfg: TrainConfig) -> None:
    """ValueError naming ``labels`` entries that are not columns of the data's schema/selection."""
    schema = label_schema(data)
    available = data.observations or list(schema.observations)
    problems = []
    unknown = [label for label in labels if label not in available]
    if unknown:
        problems.append(f"labels: {unknown} are not labels of the data {data.csv} (it has: {', '.join(available)})")
    grid_unknown = [lab for lab in cfg.validation.labels or [] if lab not in available and lab != NO_FINDING]
    if grid_unknown:
        problems.append(
            f"validation.labels: {grid_unknown} are not labels of the data (it has: {', '.join(available)})"
        )
    if uses_class_set(cfg) and cfg.dreambooth.class_source == "no_finding" and NO_FINDING not in schema.observations:
        problems.append(
            f"dreambooth.class_source: 'no_finding' needs a {NO_FINDING!r} column, which this data lacks; "
            "use class_source=generated"
        )
    if problems:
        raise ValueError("; ".join(problems))


def class_prompt(cfg: TrainConfig, label: str) -> str:
    """The prompt the base model draws generated class images from: the instance prompt without identifier."""
    return instance_prompt(None, cfg, label, {label: label}, identifier=False)


def _class_set(
    cfg: TrainConfig, data: DataConfig, label: str, words: dict[str, str], class_csv: Path | None
) -> tuple[LabelledImages, list[str]]:
    """The class images of prior preservation and their prompts (no identifier)."""
    if cfg.dreambooth.class_source == "generated":
        if class_csv is None:
            raise ValueError("dreambooth.class_source=generated: the class images were not generated first")
        generated = load_dataset(data.model_copy(update={"csv": str(class_csv), "root": None}))
        return generated, [class_prompt(cfg, label)] * len(generated.frame)
    try:
        real = load_dataset(data.model_copy(update={"observations": None}), positive_for=[NO_FINDING])
    except ValueError as error:
        raise ValueError(f"dreambooth.class_source=no_finding: no {NO_FINDING} images to use: {error}") from None
    # A seeded sample, sorted, so the class set is the same on every rerun.
    rng = np.random.default_rng([cfg.seed, len(real.frame)])
    keep = np.sort(rng.choice(len(real.frame), min(cfg.dreambooth.num_class_images, len(real.frame)), replace=False))
    frame = real.frame.iloc[keep].reset_index(drop=True)[list(real.frame.columns)]
    real = dataclasses.replace(real, frame=frame)
    return real, [labels_prompt(row, cfg, [label], words) for row in _records(real)]


def class_image_path(label: str, index: int) -> str:
    """Path of generated class image ``index`` of ``label``, relative to the class-image folder."""
    return f"{label_slug(label)}/{index:05d}.png"


def class_images_frame(label: str, data: DataConfig, count: int) -> pd.DataFrame:
    """The CSV rows of ``count`` generated class images of ``label`` in the data's schema: Path
    ``<slug>/<i>.png``, the validation view, ``label`` positive, everything else blank."""
    schema = label_schema(data)
    frame = pd.DataFrame({column: np.nan for column in schema.columns}, index=range(count))
    frame[PATH_COLUMN] = [class_image_path(label, i) for i in range(count)]
    if VIEW_COLUMN in schema.metadata_columns:
        frame[VIEW_COLUMN] = VALIDATION_VIEW
    frame[label] = 1.0
    return frame


def validation_rows(cfg: TrainConfig, training_set: TrainingSet) -> list[tuple[str, str]]:
    """(row title, prompt) of each validation-grid row: one per label, No Finding last."""
    words = label_words(cfg, training_set.labels)
    view, projection = (VALIDATION_VIEW, VALIDATION_PROJECTION) if cfg.include_view else (None, None)
    if cfg.conditioning != "labels":
        (label,) = training_set.labels
        rows = [(f"{label} ({cfg.dreambooth.identifier})", instance_prompt(None, cfg, label, words, identifier=True))]
        if cfg.method != "textual_inversion":
            rows.append((label, class_prompt(cfg, label)))
        return rows + [(NO_FINDING, format_prompt(PromptParts((), view, projection)))]
    titles = cfg.validation.labels or [*training_set.labels, NO_FINDING]
    return [
        (title, format_prompt(PromptParts(() if title == NO_FINDING else (words.get(title, title),), view, projection)))
        for title in titles
    ]


def per_label_configs(cfg: TrainConfig, data: DataConfig) -> list[tuple[str, TrainConfig]]:
    """One instance-conditioned config per label, each writing to ``<out>/<label-slug>`` under its own run name."""
    configs = []
    for label in trained_labels(cfg, data):
        slug = label_slug(label)
        raw = cfg.model_dump(mode="json")
        raw.update(conditioning="instance", labels=[label], out=str(Path(cfg.out) / slug))
        raw["data"] = data.model_dump(mode="json")
        raw["checkpoint"]["run_name"] = f"{cfg.checkpoint.run_name}-{slug}"
        configs.append((label, TrainConfig.model_validate(raw)))
    return configs


def _records(images: LabelledImages) -> list[dict]:
    return images.frame.to_dict("records")
