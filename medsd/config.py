"""Every pydantic config of medsd, declared once, and the one loader (YAML file + key.path=value overrides).

The CLI, jobs/ and tests build configs only through :func:`load_config`; Ray workers receive
``cfg.model_dump(mode="json")`` and re-validate it. Defaults live here and nowhere else.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medsd.labels import PROJECTIONS, VIEWS, UncertaintyPolicy


class StrictModel(BaseModel):
    """Unknown keys are errors, so a typo in a YAML file never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Where a CheXpert-style dataset is and which part of it to use."""

    csv: str | None = Field(None, description="CheXpert-style CSV (Path + label columns); None means the phantom")
    root: str | None = Field(
        None, description="folder the CSV's Paths are relative to (the dataset folder or its parent)"
    )
    label_columns: list[str] | None = Field(
        None,
        description="label columns of a non-CheXpert image set (e.g. [RG, NRG]; its CSV is Path + these); "
        "None means the CheXpert schema",
    )
    observations: list[str] | None = Field(
        None, description="label columns to use, in order; None means every label of the schema"
    )
    uncertainty_policy: UncertaintyPolicy = Field(
        UncertaintyPolicy.IGNORE, description="what an uncertain (-1) label means: U-Ignore, U-Zeros or U-Ones"
    )
    views: list[Literal["Frontal", "Lateral"]] = Field(
        default_factory=lambda: list(VIEWS), description="keep only these Frontal/Lateral views"
    )
    projections: list[str] | None = Field(None, description="keep only these AP/PA values (None keeps all)")
    image_size_px: int = Field(64, ge=8, le=4096, description="square side images are resized to")
    resize_mode: Literal["pad", "crop"] = Field(
        "pad", description="aspect-preserving square: pad the short side or centre-crop the long one"
    )
    skip_bad: bool = Field(False, description="skip bad rows and images (counted in a report) instead of failing")

    @field_validator("projections")
    @classmethod
    def _known_projections(cls, value: list[str] | None) -> list[str] | None:
        unknown = [p for p in value or [] if p not in PROJECTIONS]
        if unknown:
            raise ValueError(f"data.projections: unknown {unknown}; expected a subset of {list(PROJECTIONS)}")
        return value


class PhantomConfig(StrictModel):
    """The procedural CheXpert-style dataset every workload runs on by default."""

    n_images: int = Field(2000, ge=1, description="images in train.csv + valid.csv together")
    image_size_px: int = Field(128, ge=32, le=1024, description="side of each square PNG")
    seed: int = Field(0, description="everything about the dataset follows from this seed")
    valid_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share of patients put in valid.csv")
    lateral_fraction: float = Field(0.15, ge=0.0, le=1.0, description="share of studies that also get a lateral view")


class ModelConfig(StrictModel):
    """Which Stable Diffusion pipeline to load and on what device and precision."""

    model: str = Field("tiny", description="'tiny' (the embedded model), a local diffusers folder, or a hub id")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="weights dtype for inference; auto is fp32 on CPU, bf16/fp16 on GPU"
    )
    cache_dir: str | None = Field(
        None, description="where the embedded tiny model is built and cached (default ~/.cache/medsd)"
    )


class DemoConfig(StrictModel):
    """`medsd demo`: the embedded pipeline end to end on a local Ray."""

    out: str = Field("medsd-demo", description="output folder of every demo stage")
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    grid_seed: int = Field(0, description="seed of the first sample-grid image (one seed per cell after it)")
    grid_steps: int = Field(20, ge=1, le=1000, description="denoising steps per sample-grid image")
    guidance_scale: float = Field(4.0, ge=0.0, le=30.0, description="classifier-free guidance of the grid")


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_config(config_class: type[ConfigT], path: str | Path | None = None, overrides: list[str] = ()) -> ConfigT:
    """Build ``config_class`` from an optional YAML file plus ``key.path=value`` overrides.

    Values are parsed as YAML scalars (``3``, ``true``, ``[a, b]``). Unknown keys raise ValueError
    naming the key and the nearest valid one.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}")
        raw = loaded
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r}: expected key.path=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    _check_keys(config_class, raw, prefix="")
    try:
        return config_class.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors()
        )
        source = f" in {path}" if path is not None else ""
        raise ValueError(f"invalid {config_class.__name__}{source}: {problems}") from None


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a group of settings")
    target[leaf] = value


def _check_keys(config_class: type[BaseModel], raw: dict[str, Any], prefix: str) -> None:
    """Reject unknown keys with the nearest valid spelling, recursing into nested configs."""
    fields = config_class.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            nearest = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{nearest[0]}'?" if nearest else f"; valid keys: {', '.join(fields)}"
            raise ValueError(f"unknown config key {dotted!r}{hint}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            _check_keys(annotation, value, prefix=f"{dotted}.")
