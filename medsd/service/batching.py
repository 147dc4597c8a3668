"""Validated generation jobs, grouped into batches that one pipeline call can run, and split back.

A Serve batch mixes requests; one ``sample_images`` call needs one size, step count, sampler, guidance,
negative prompt and adapter. So a batch is grouped by :attr:`GenerationJob.key`, each group runs as one
call, and the images go back to their requests in order. :class:`BatchMerger` merges the batches that
wait for the pipeline into one run. Torch-free: the sampler is passed in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from medsd.provenance import Provenance, encode_png


@dataclass(frozen=True)
class BatchKey:
    """Settings every image of one pipeline call shares."""

    height: int
    width: int
    steps: int
    sampler: str
    guidance_scale: float
    negative_prompt: str
    adapter: str | None


@dataclass(frozen=True)
class GenerationJob:
    """One validated request: a prompt, one seed per image, and the shared settings."""

    prompt: str
    seeds: tuple[int, ...]
    key: BatchKey

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int


@dataclass(frozen=True)
class JobResult:
    """The images of one job and the size of the Serve batch it ran in (requests, images)."""

    images: tuple[GeneratedImage, ...]
    batch_requests: int
    batch_images: int


# (key, prompts, seeds) -> (N, H, W) uint8 images, one per prompt.
SampleGroup = Callable[[BatchKey, list[str], list[int]], np.ndarray]


def count_images(jobs: Sequence[GenerationJob]) -> int:
    """Batch size in images, so that a batch's cost, not its request count, is bounded."""
    return sum(job.num_images for job in jobs)


def group_jobs(jobs: Sequence[GenerationJob]) -> dict[BatchKey, list[int]]:
    """Indices of ``jobs`` by batch key, groups and members in arrival order."""
    groups: dict[BatchKey, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.key, []).append(index)
    return groups


def run_batch(jobs: Sequence[GenerationJob], sample_group: SampleGroup, model_hash: str) -> list[JobResult]:
    """Run every group of ``jobs`` through ``sample_group`` once; PNGs with provenance, in job order."""
    images: list[tuple[GeneratedImage, ...]] = [()] * len(jobs)
    for key, members in group_jobs(jobs).items():
        prompts = [jobs[i].prompt for i in members for _seed in jobs[i].seeds]
        seeds = [seed for i in members for seed in jobs[i].seeds]
        pixels = sample_group(key, prompts, seeds)  # (N, H, W) uint8
        if len(pixels) != len(seeds):
            raise RuntimeError(f"sampler returned {len(pixels)} images for {len(seeds)} seeds")
        cursor = 0
        for i in members:
            job = jobs[i]
            images[i] = tuple(
                GeneratedImage(png=encode_png(pixels[cursor + n], provenance(job, seed, model_hash)), seed=seed)
                for n, seed in enumerate(job.seeds)
            )
            cursor += job.num_images
    total_images = count_images(jobs)
    return [JobResult(images=found, batch_requests=len(jobs), batch_images=total_images) for found in images]


def provenance(job: GenerationJob, seed: int, model_hash: str) -> Provenance:
    """What the PNG of ``seed`` in ``job`` says about itself."""
    key = job.key
    return Provenance(
        prompt=job.prompt,
        seed=seed,
        guidance_scale=key.guidance_scale,
        steps=key.steps,
        sampler=key.sampler,
        model_hash=model_hash,
        negative_prompt=key.negative_prompt,
    )


RunBatch = Callable[[list[GenerationJob]], list[JobResult]]


class BatchMerger:
    """Runs jobs on one pipeline, one run at a time, each run taking every job waiting (up to ``max_images``).

    Serve forms its next batch while the current one runs (ray/serve/batching.py, ``_process_batches``), so
    closed-loop clients split into cohorts that never meet: 7 + 1 instead of 8, and the fixed cost of a
    pipeline call is paid twice. So batches queued behind a run merge into the next run, and after a run of
    several requests (or with jobs already waiting) the next run waits up to ``linger_s`` for the clients just
    answered to send again: until the jobs that were waiting plus as many images as the last run are back,
    or a run is full. After a lone request or an idle spell nothing lingers: a lone request runs at once.
    """

    def __init__(self, run_batch: RunBatch, max_images: int, linger_s: float):
        self._run_batch = run_batch
        self._max_images = max_images
        self._linger_s = linger_s
        self._waiting: list[tuple[GenerationJob, asyncio.Future]] = []
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task | None = None

    async def submit(self, jobs: Sequence[GenerationJob]) -> list[JobResult]:
        """Results of ``jobs`` in order, from whichever run picks them up."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._waiting.extend(zip(jobs, futures, strict=True))
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run_waiting())
        return list(await asyncio.gather(*futures))

    async def _run_waiting(self) -> None:
        while self._waiting:
            taken = self._take_run()
            jobs = [job for job, _future in taken]
            try:
                # A worker thread: the event loop keeps accepting (and queueing) requests during the run.
                results = await asyncio.to_thread(self._run_batch, jobs)
            except Exception as error:  # every request of this run gets the error; the runner goes on
                for _job, future in taken:
                    future.set_exception(error)
            else:
                for (_job, future), result in zip(taken, results, strict=True):
                    future.set_result(result)
            if len(jobs) > 1 or self._waiting:
                await self._linger(count_images(jobs) + self._waiting_images())

    def _waiting_images(self) -> int:
        return count_images([job for job, _future in self._waiting])

    async def _linger(self, expected_images: int) -> None:
        """Wait until ``expected_images`` (or a full run) are waiting, or ``linger_s`` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger_s
        while self._waiting_images() < min(expected_images, self._max_images):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_run(self) -> list[tuple[GenerationJob, asyncio.Future]]:
        """The oldest waiting jobs whose images fit in one run (always at least one job)."""
        taken, images = [], 0
        while self._waiting and (not taken or images + self._waiting[0][0].num_images <= self._max_images):
            images += self._waiting[0][0].num_images
            taken.append(self._waiting.pop(0))
        return taken
