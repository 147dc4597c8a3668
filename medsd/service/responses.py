"""A finished job -> the HTTP answer: one PNG with headers, or JSON with base64 PNGs and their metadata."""

from __future__ import annotations

import base64

from medsd.service.batching import GenerationJob, JobResult
from medsd.service.schema import Catalog, GenerateResponse, ImageRecord

PNG_MEDIA_TYPE = "image/png"
# Response headers; X-Batch-Size shows batching from outside without timing anything.
BATCH_SIZE_HEADER = "X-Batch-Size"
BATCH_IMAGES_HEADER = "X-Batch-Images"
SEED_HEADER = "X-Seed"
MODEL_HASH_HEADER = "X-Model-Hash"
SYNTHETIC_HEADER = "X-Synthetic"


def png_filename(model_hash: str, seed: int) -> str:
    """Download name of one image: the model and seed make it again."""
    return f"medsd-{model_hash}-seed{seed}.png"


def response_headers(job: GenerationJob, result: JobResult, catalog: Catalog) -> dict[str, str]:
    """Headers both formats carry (only ASCII: prompts stay in the body and the PNG chunks)."""
    return {
        BATCH_SIZE_HEADER: str(result.batch_requests),
        BATCH_IMAGES_HEADER: str(result.batch_images),
        SEED_HEADER: str(job.seeds[0]),
        MODEL_HASH_HEADER: catalog.model_hash,
        SYNTHETIC_HEADER: "true",
    }


def png_headers(job: GenerationJob, result: JobResult, catalog: Catalog) -> dict[str, str]:
    filename = png_filename(catalog.model_hash, job.seeds[0])
    return {**response_headers(job, result, catalog), "Content-Disposition": f'inline; filename="{filename}"'}


def json_body(job: GenerationJob, result: JobResult, catalog: Catalog) -> GenerateResponse:
    key = job.key
    records = [
        ImageRecord(
            png_base64=base64.b64encode(image.png).decode("ascii"),
            seed=image.seed,
            prompt=job.prompt,
            negative_prompt=key.negative_prompt,
            steps=key.steps,
            guidance_scale=key.guidance_scale,
            sampler=key.sampler,
            height=key.height,
            width=key.width,
            adapter=key.adapter,
            model_hash=catalog.model_hash,
        )
        for image in result.images
    ]
    return GenerateResponse(images=records, model=catalog.model, batch_size=result.batch_requests)
