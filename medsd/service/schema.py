"""The HTTP API's request and response bodies (FastAPI publishes them as OpenAPI at /docs).

Requests are strict: a JSON string where a number belongs, an unknown field or a NaN is a 422 naming the
field, never a silent coercion. Bounds that depend on the deployment (prompt length, the model's sizes,
samplers and adapters) are checked in :mod:`medsd.service.validation`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from medsd.config import MAX_GUIDANCE_SCALE, MAX_IMAGES_PER_REQUEST, MAX_STEPS_PER_REQUEST
from medsd.labels import CHEXPERT_OBSERVATIONS, PROJECTIONS, VIEWS

API_VERSION = "v1"
# Seeds travel through JavaScript clients (the web page), whose numbers are exact only below 2**53;
# image i of a request uses seed + i, so the largest seed leaves room for a full request.
MAX_SEED = 2**53 - MAX_IMAGES_PER_REQUEST
# Generous static caps so that absurd inputs fail in the schema; the configured limits are tighter.
MAX_TEXT_CHARS = 100_000
MAX_IMAGE_SIDE_PX = 4096

ImageFormat = Literal["png", "json"]


class GenerateRequest(BaseModel):
    """POST /v1/generate: what to draw (``prompt`` or ``labels``) and how."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"labels": ["Cardiomegaly"], "view": "Frontal", "seed": 7, "format": "json"}]},
    )

    prompt: str | None = Field(
        None, max_length=MAX_TEXT_CHARS, description="free text; give either this or labels", examples=["a chest x-ray"]
    )
    labels: list[str] | None = Field(
        None,
        min_length=1,
        max_length=len(CHEXPERT_OBSERVATIONS),
        description="CheXpert observations to show (GET /v1/labels); ['No Finding'] for a normal study",
    )
    view: Literal[VIEWS] | None = Field(None, description="Frontal or Lateral; only with labels")  # type: ignore[valid-type]
    projection: Literal[PROJECTIONS] | None = Field(  # type: ignore[valid-type]
        None, description="AP, PA, LL or RL; only with labels and a Frontal view"
    )
    negative_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="what to steer away from")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST, description="images to generate (format json for >1)")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS_PER_REQUEST, description="denoising steps (server default)")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False, description="classifier-free guidance"
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="seed of the first image (image i uses seed + i); random when omitted"
    )
    sampler: str | None = Field(None, max_length=64, description="one of GET /v1/models samplers (server default)")
    height: int | None = Field(None, ge=1, le=MAX_IMAGE_SIDE_PX, description="pixels; one of the model's sizes")
    width: int | None = Field(None, ge=1, le=MAX_IMAGE_SIDE_PX, description="pixels; one of the model's sizes")
    adapter: str | None = Field(None, max_length=256, description="a loaded LoRA / embedding (GET /v1/models)")
    format: ImageFormat = Field("png", description="png: one image as image/png; json: base64 PNGs with metadata")


class ImageRecord(BaseModel):
    """One generated image in a JSON answer, with everything needed to make it again."""

    png_base64: str = Field(description="the PNG, base64; its text chunks carry the same provenance")
    seed: int
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    sampler: str
    height: int
    width: int
    adapter: str | None
    model_hash: str
    synthetic: Literal[True] = Field(True, description="always true: a synthetic image, never a patient's")


class GenerateResponse(BaseModel):
    """POST /v1/generate with format json."""

    images: list[ImageRecord]
    model: str = Field(description="the served base model")
    batch_size: int = Field(description="requests the server ran in the same batch as this one")


class LabelsResponse(BaseModel):
    """GET /v1/labels: what ``labels``, ``view`` and ``projection`` accept."""

    observations: list[str]
    no_finding: str
    views: list[str]
    projections: list[str]


class AdapterInfo(BaseModel):
    name: str
    kind: str = Field(description="lora or textual_inversion")


class Catalog(BaseModel):
    """GET /v1/models: the served base model, its adapters and what a request may choose."""

    model: str = Field(description="the base model as configured ('tiny', a folder name or a hub id)")
    model_hash: str = Field(description="content hash of the base model's weights and configs")
    sizes: list[tuple[int, int]] = Field(description="(height, width) pairs the model generates")
    samplers: list[str]
    adapters: list[AdapterInfo]
    default_steps: int
    default_guidance_scale: float
    default_sampler: str
    max_images_per_request: int = MAX_IMAGES_PER_REQUEST
    max_steps: int = MAX_STEPS_PER_REQUEST
    max_guidance_scale: float = MAX_GUIDANCE_SCALE


class FieldError(BaseModel):
    field: str = Field(description="dotted request field, e.g. 'num_images' or 'labels[1]'; 'body' for the whole")
    message: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: one readable line plus the problems per field."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
