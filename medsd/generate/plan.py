"""The generation plan: every image of a synthetic dataset as a row (id, labels, prompt, seed, ...) before any
pixel exists.

A plan is a pure function of the config, the model hash and (for ``match`` and ``balanced``) the source CSV:
the same inputs give the same ids, prompts, seeds and file names, which is what makes reruns reproducible and
resumable.
Rows are grouped by label folder, then guidance scale, then index, and cut into shards (one parquet file
each) of at most ``rows_per_shard`` rows that never straddle a label or a guidance scale. Shards are cut
into batches of at most ``batch_size`` rows: one pipeline call each. Batches are part of the plan, not of
scheduling, because floating-point sums depend on batch shape: the same image rendered in another batch
can differ by one grey level in a pixel, and a resumed run must reproduce an uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsd.config import GenerateConfig
from medsd.data import BadInputReport, load_dataset
from medsd.labels import (
    AGE_COLUMN,
    CHEXPERT_OBSERVATIONS,
    NO_FINDING,
    PATH_COLUMN,
    POSITIVE,
    PROJECTION_COLUMN,
    SEX_COLUMN,
    UNCERTAIN,
    VIEW_COLUMN,
    VIEWS,
    label_slug,
)
from medsd.prompts import PromptParts, format_prompt, parse_prompt, prompt_for_labels

# Columns of a plan row besides the CheXpert ones. ``label`` is the label folder (slug) and parquet partition;
# ``shard`` and ``plan_index`` are bookkeeping that never reaches the dataset.
ID = "id"
LABEL = "label"
PROMPT = "prompt"
NEGATIVE_PROMPT = "negative_prompt"
SEED = "seed"
GUIDANCE_SCALE = "guidance_scale"
STEPS = "steps"
SAMPLER = "sampler"
MODEL_HASH = "model_hash"
ADAPTER = "adapter"
SYNTHETIC = "synthetic"
SHARD = "shard"
PLAN_INDEX = "plan_index"
# Columns the generator actor adds to each row.
PNG_BYTES = "png_bytes"
SHA256 = "sha256"
REUSED = "reused"  # the PNG was already on disk, verified, from an earlier (interrupted) run

IMAGES_FOLDER = "images"
ID_INDEX_DIGITS = 6  # zero padding keeps ids of one label sorting in plan order up to a million images
SEED_BITS = 63  # seeds fit a signed 64-bit parquet column and torch.Generator.manual_seed
MATCH_STREAM = "match"  # names the random stream that draws source rows, apart from per-image seeds
BALANCED_STREAM = "balanced"  # the same for the balanced plan (one stream per label)
BLANK_TEXT = ""  # Sex / AP/PA / adapter not given; the writers turn it into a blank (null) cell


@dataclass(frozen=True)
class Shard:
    """Consecutive plan rows ``[start, stop)`` of one label folder and guidance scale: one parquet file."""

    name: str
    label: str  # label folder (slug), the hive partition value
    start: int
    stop: int

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    @property
    def parquet_path(self) -> str:
        """Where the shard's rows live, relative to the output folder (hive-partitioned by label)."""
        return f"data/{LABEL}={self.label}/{self.name}.parquet"


@dataclass
class GenerationPlan:
    """Every planned image as a row (plan order), its shards, and what reading the source CSV skipped."""

    kind: str
    rows: list[dict]
    shards: list[Shard]
    batch_size: int
    source_report: BadInputReport | None = None
    source_sha256: str | None = None
    adapter_hashes: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of every row and the shard layout: two plans with equal fingerprints write equal datasets."""
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(json.dumps(row, sort_keys=True, allow_nan=True).encode())
        for shard in self.shards:
            digest.update(f"{shard.name}:{shard.start}:{shard.stop}\n".encode())
        digest.update(f"batch_size:{self.batch_size}".encode())
        return digest.hexdigest()

    def batches(self, shard: Shard) -> list[list[dict]]:
        """The rows of ``shard`` cut into the plan's batches (one pipeline call each), in plan order."""
        return [
            self.rows[start : min(start + self.batch_size, shard.stop)]
            for start in range(shard.start, shard.stop, self.batch_size)
        ]

    def images_per_label(self) -> dict[str, int]:
        """label folder -> planned images, in plan order."""
        counts: dict[str, int] = {}
        for shard in self.shards:
            counts[shard.label] = counts.get(shard.label, 0) + shard.n_rows
        return counts

    def positive_rates(self) -> dict[str, float]:
        """observation -> share of planned images whose prompt names it (No Finding: names none)."""
        n = max(len(self.rows), 1)
        return {o: sum(row[o] == POSITIVE for row in self.rows) / n for o in CHEXPERT_OBSERVATIONS}


@dataclass(frozen=True)
class _Draft:
    """One image before guidance scales multiply it: what it shows, who it pretends to be, its seed key."""

    parts: PromptParts
    seed_key: str
    sex: str = BLANK_TEXT
    age: float = math.nan
    folder: str | None = None  # the label folder; None: the prompt's primary label


def build_plan(
    cfg: GenerateConfig,
    model_hash: str,
    adapter_hashes: Mapping[str, str] | None = None,
    placeholder_tokens: Mapping[str, str] | None = None,
) -> GenerationPlan:
    """The plan ``cfg`` describes for the model with ``model_hash``.

    ``adapter_hashes``: adapter name -> content hash, for labels of ``cfg.label_adapters``;
    ``placeholder_tokens``: label -> textual-inversion token put in that label's prompts. ValueError
    naming the config field for a prompt outside medsd's grammar or an unusable source CSV.
    """
    adapter_hashes = dict(adapter_hashes or {})
    placeholder_tokens = dict(placeholder_tokens or {})
    source_report, source_sha256 = None, None
    if cfg.plan == "per_label":
        drafts = per_label_drafts(cfg, placeholder_tokens)
    elif cfg.plan == "prompts":
        drafts = prompt_drafts(cfg.prompts, cfg.per_label)
    else:
        draw = match_drafts if cfg.plan == "match" else balanced_drafts
        drafts, source_report = draw(cfg, placeholder_tokens)
        source_sha256 = file_sha256(Path(cfg.source.csv))

    by_label: dict[str, list[_Draft]] = {}
    for draft in drafts:
        by_label.setdefault(draft.folder or primary_label(draft.parts), []).append(draft)
    rows: list[dict] = []
    shards: list[Shard] = []
    for label in sorted(by_label, key=CHEXPERT_OBSERVATIONS.index):
        adapter = cfg.label_adapters.get(label)
        row_model_hash = model_hash if adapter is None else f"{model_hash}+{adapter_hashes[adapter]}"
        for scale in cfg.guidance_scales:
            group_start = len(rows)
            for index, draft in enumerate(by_label[label]):
                rows.append(_row(cfg, draft, label, index, scale, row_model_hash, adapter, len(rows)))
            shards.extend(_cut_shards(rows, group_start, len(rows), cfg.rows_per_shard))
    for shard in shards:
        for row in rows[shard.start : shard.stop]:
            row[SHARD] = shard.name
    return GenerationPlan(cfg.plan, rows, shards, cfg.batch_size, source_report, source_sha256, adapter_hashes)


def primary_label(parts: PromptParts) -> str:
    """The label folder of an image: its first finding in schema order, else its first possible finding (an
    image prompted 'possible atelectasis' is not a No Finding image), else No Finding."""
    named = parts.findings or parts.uncertain
    if not named:
        return NO_FINDING
    return min(named, key=CHEXPERT_OBSERVATIONS.index)


def image_id(label: str, index: int, guidance_scale: float) -> str:
    """'cardiomegaly-000012-g4': label folder, index within the label, guidance scale. Unique within a plan."""
    return f"{label_slug(label)}-{index:0{ID_INDEX_DIGITS}d}-g{guidance_scale:g}"


def image_path(label: str, identifier: str) -> str:
    """Relative PNG path of an image: a pure function of its label and id."""
    return f"{IMAGES_FOLDER}/{label_slug(label)}/{identifier}.png"


def derive_seed(plan_seed: int, key: str) -> int:
    """A 63-bit seed from the plan's seed and an image's key; independent of every other image in the plan."""
    digest = hashlib.sha256(f"{plan_seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


def allocate_views(n_images: int, shares: Mapping[str, float]) -> list[str]:
    """``n_images`` views in proportion to ``shares`` (largest remainder, schema order): deterministic counts."""
    total = sum(shares.values())
    quotas = {view: n_images * shares.get(view, 0.0) / total for view in VIEWS}
    counts = {view: math.floor(quota) for view, quota in quotas.items()}
    by_remainder = sorted(VIEWS, key=lambda view: (-(quotas[view] - counts[view]), VIEWS.index(view)))
    for view in by_remainder[: n_images - sum(counts.values())]:
        counts[view] += 1
    return [view for view in VIEWS for _ in range(counts[view])]


# ---------------------------------------------------------------------------------------------------------------
# Drafts of each plan kind
# ---------------------------------------------------------------------------------------------------------------


def per_label_drafts(cfg: GenerateConfig, placeholder_tokens: Mapping[str, str]) -> list[_Draft]:
    """``cfg.per_label`` single-finding images for each of ``cfg.labels`` and for No Finding."""
    labels = [label for label in cfg.labels if label != NO_FINDING] + [NO_FINDING]
    views = allocate_views(cfg.per_label, cfg.views)
    drafts = []
    for label in labels:
        findings = () if label == NO_FINDING else (label,)
        identifier = placeholder_tokens.get(label, cfg.identifier)
        for index, view in enumerate(views):
            projection = cfg.projection if view == "Frontal" else None
            parts = PromptParts(findings, view, projection, identifier)
            drafts.append(_Draft(parts, seed_key=f"{label}/{index}"))
    return drafts


def prompt_drafts(prompts: Sequence[str], per_prompt: int) -> list[_Draft]:
    """``per_prompt`` images of each prompt; every prompt must parse and name a view (the CSV needs one)."""
    problems, parsed = [], []
    for number, prompt in enumerate(prompts):
        try:
            parts = parse_prompt(prompt)
        except ValueError as error:
            problems.append(f"generate.prompts[{number}]: {error}")
            continue
        if parts.view is None:
            problems.append(
                f"generate.prompts[{number}]: {prompt!r} names no view; start it 'a frontal ...' or 'a lateral ...'"
            )
        if parts in parsed:
            problems.append(f"generate.prompts[{number}]: {prompt!r} repeats an earlier prompt (same images twice)")
        parsed.append(parts)
    if problems:
        raise ValueError("; ".join(problems))
    return [
        _Draft(parts, seed_key=f"prompt/{format_prompt(parts)}/{index}")
        for parts in parsed
        for index in range(per_prompt)
    ]


def match_drafts(cfg: GenerateConfig, placeholder_tokens: Mapping[str, str]) -> tuple[list[_Draft], BadInputReport]:
    """``cfg.n_images`` rows drawn with replacement from ``cfg.source``: label vectors, view, projection, sex
    and age together, so co-occurrence is the source's. No Path or other source identifier is kept."""
    source = _SourceRows.load(cfg)
    rng = np.random.default_rng([cfg.seed, int.from_bytes(MATCH_STREAM.encode(), "big")])
    drawn = rng.integers(0, source.n_rows, size=cfg.n_images)
    drafts = [
        source.draft(row, f"{MATCH_STREAM}/{number}", cfg, placeholder_tokens) for number, row in enumerate(drawn)
    ]
    return drafts, source.report


def balanced_drafts(cfg: GenerateConfig, placeholder_tokens: Mapping[str, str]) -> tuple[list[_Draft], BadInputReport]:
    """``cfg.per_label`` rows for each of ``cfg.labels`` and No Finding, each drawn (with replacement) from the
    source rows positive for that label. A per-disease set whose images keep the source's co-occurring
    findings: single-finding prompts would teach a classifier that, say, effusion means "not atelectasis"."""
    source = _SourceRows.load(cfg)
    labels = [label for label in cfg.labels if label != NO_FINDING] + [NO_FINDING]
    drafts = []
    for label in labels:
        candidates = np.flatnonzero(source.column(label) == POSITIVE)
        if len(candidates) == 0:
            raise ValueError(
                f"generate.source: {cfg.source.csv} has no row positive for {label!r} (after its views "
                f"filter); the balanced plan draws each label's images from its positive rows"
            )
        # One random stream per label: adding or removing a label leaves the others' rows as they were.
        rng = np.random.default_rng(derive_seed(cfg.seed, f"{BALANCED_STREAM}/{label}"))
        for index, row in enumerate(rng.choice(candidates, size=cfg.per_label)):
            drafts.append(source.draft(row, f"{BALANCED_STREAM}/{label}/{index}", cfg, placeholder_tokens, label))
    return drafts, source.report


@dataclass(frozen=True)
class _SourceRows:
    """The columns of a real CSV that plans draw rows from (labels, view, projection, sex, age); never its Paths."""

    observations: list[str]
    labels: np.ndarray  # (rows, observations) raw CheXpert values
    views: np.ndarray | None
    projections: np.ndarray | None
    sexes: np.ndarray | None
    ages: np.ndarray | None
    report: BadInputReport

    @classmethod
    def load(cls, cfg: GenerateConfig) -> _SourceRows:
        if cfg.source.label_columns is not None:
            raise ValueError(
                f"generate.source.label_columns: the {cfg.plan} plan writes CheXpert prompts and columns; "
                "leave label_columns unset (a CheXpert-style CSV)"
            )
        try:
            source = load_dataset(cfg.source, check_files=False)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"generate.source: {error}") from None
        frame = source.frame

        def text_column(name: str) -> np.ndarray | None:
            return frame[name].astype("object").to_numpy() if name in frame else None

        return cls(
            observations=list(source.observations),
            labels=frame[list(source.observations)].to_numpy(dtype=np.float64),
            views=text_column(VIEW_COLUMN),
            projections=text_column(PROJECTION_COLUMN),
            sexes=text_column(SEX_COLUMN),
            ages=frame[AGE_COLUMN].to_numpy(dtype=np.float64) if AGE_COLUMN in frame else None,
            report=source.report,
        )

    @property
    def n_rows(self) -> int:
        return len(self.labels)

    def column(self, observation: str) -> np.ndarray:
        """Raw values of one observation (all NaN when the CSV lacks it)."""
        if observation not in self.observations:
            return np.full(self.n_rows, math.nan)
        return self.labels[:, self.observations.index(observation)]

    def draft(
        self,
        row: int,
        seed_key: str,
        cfg: GenerateConfig,
        placeholder_tokens: Mapping[str, str],
        folder: str | None = None,
    ) -> _Draft:
        """The image of source row ``row``: its prompt under the source's uncertainty policy, its sex and age."""
        values: dict[str, object] = dict(zip(self.observations, self.labels[row], strict=True))
        values[VIEW_COLUMN] = _text(self.views[row]) if self.views is not None else "Frontal"
        values[PROJECTION_COLUMN] = _text(self.projections[row]) if self.projections is not None else None
        source = cfg.source
        prompt = prompt_for_labels(
            values, policy=source.uncertainty_policy, identifier=cfg.identifier, name_uncertain=source.name_uncertain
        )
        parts = parse_prompt(prompt)
        token = placeholder_tokens.get(folder or primary_label(parts))
        if token is not None:
            parts = dataclasses.replace(parts, identifier=token)
        return _Draft(
            parts,
            seed_key=seed_key,
            sex=(_text(self.sexes[row]) or BLANK_TEXT) if self.sexes is not None else BLANK_TEXT,
            age=float(self.ages[row]) if self.ages is not None else math.nan,
            folder=folder,
        )


# ---------------------------------------------------------------------------------------------------------------
# Rows and shards
# ---------------------------------------------------------------------------------------------------------------


def _row(
    cfg: GenerateConfig,
    draft: _Draft,
    label: str,
    index: int,
    guidance_scale: float,
    model_hash: str,
    adapter: str | None,
    plan_index: int,
) -> dict:
    parts = draft.parts
    identifier = image_id(label, index, guidance_scale)
    # The label columns say what the prompt asks for: named findings 1.0, possible ones -1.0 (uncertain), No
    # Finding 1.0 when it names none, everything else blank ("not mentioned"), as a CheXpert report leaves it.
    named = set(parts.findings) if parts.findings or parts.uncertain else {NO_FINDING}
    return {
        PLAN_INDEX: plan_index,
        ID: identifier,
        LABEL: label_slug(label),
        PATH_COLUMN: image_path(label, identifier),
        SEX_COLUMN: draft.sex,
        AGE_COLUMN: float(round(draft.age)) if not math.isnan(draft.age) else math.nan,  # whole years, as CheXpert
        VIEW_COLUMN: parts.view,
        PROJECTION_COLUMN: parts.projection or BLANK_TEXT,
        **{o: _label_value(o, named, parts.uncertain) for o in CHEXPERT_OBSERVATIONS},
        PROMPT: format_prompt(parts),
        NEGATIVE_PROMPT: cfg.negative_prompt,
        SEED: derive_seed(cfg.seed, draft.seed_key),
        GUIDANCE_SCALE: float(guidance_scale),
        STEPS: cfg.steps,
        SAMPLER: cfg.sampler,
        MODEL_HASH: model_hash,
        ADAPTER: adapter or BLANK_TEXT,
        SYNTHETIC: True,
    }


def _label_value(observation: str, named: set[str], uncertain: tuple[str, ...]) -> float:
    if observation in named:
        return POSITIVE
    return UNCERTAIN if observation in uncertain else math.nan


def _cut_shards(rows: list[dict], start: int, stop: int, rows_per_shard: int) -> list[Shard]:
    """Shards of ``rows[start:stop]`` (one label and guidance scale), named after their first id."""
    return [
        Shard(rows[begin][ID], rows[begin][LABEL], begin, min(begin + rows_per_shard, stop))
        for begin in range(start, stop, rows_per_shard)
    ]


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return str(value)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
