"""The Ray Serve application: a FastAPI ingress and a batched generator deployment holding the pipeline.

Deployment options come from one ServeConfig (`build_app`); each replica re-validates the config it is
given. The generator batches with ``@serve.batch`` counting images, not requests, and hands each batch to a
BatchMerger, which runs one pipeline call at a time in a worker thread and merges the batches queued behind it.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from medsd.config import MAX_IMAGES_PER_REQUEST, ServeConfig
from medsd.service.api import ServiceOverloaded, build_api
from medsd.service.batching import BatchMerger, GenerationJob, JobResult, count_images
from medsd.service.schema import Catalog

# The ingress only parses JSON and awaits the generators: a fraction of a core is plenty.
INGRESS_NUM_CPUS = 0.25
# Serve batches only hand their jobs to the BatchMerger, which runs one pipeline call at a time, so they need
# not wait for each other; each holds at least one request, so max_ongoing_requests bounds them anyway.
CONCURRENT_SERVE_BATCHES = 1024
OVERLOAD_STATUS = 503


@serve.deployment
class Generator:
    """One pipeline per replica; ``generate`` is batched across concurrent requests."""

    def __init__(self, cfg: dict):
        from medsd.service.engine import GenerationEngine  # torch: only in generator replicas

        _log_medsd_info()
        config = ServeConfig.model_validate(cfg)
        self._engine = GenerationEngine(config)
        self._merger = BatchMerger(self._engine.run, max_images=config.max_batch_images, linger_s=config.batch_linger_s)
        self.generate.set_max_batch_size(config.max_batch_images)
        self.generate.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def describe(self) -> Catalog:
        return self._engine.describe()

    # The real sizes come from ServeConfig in __init__; the decorator's must admit one full request.
    @serve.batch(
        max_batch_size=MAX_IMAGES_PER_REQUEST,
        batch_size_fn=count_images,
        max_concurrent_batches=CONCURRENT_SERVE_BATCHES,
    )
    async def generate(self, jobs: list[GenerationJob]) -> list[JobResult]:
        return await self._merger.submit(jobs)


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP API (medsd.service.api) over a handle to the generators."""

    def __init__(self, generator: DeploymentHandle, cfg: dict):
        self._config = ServeConfig.model_validate(cfg)
        self._generator = generator
        self._catalog: Catalog | None = None
        self._catalog_lock = asyncio.Lock()

    def __serve_build_asgi_app__(self):
        # The key is read on the replica, from its environment; it never travels in a config.
        return build_api(self, self._config, api_key=os.environ.get(self._config.api_key_env) or None)

    async def describe(self) -> Catalog:
        # Fixed for the life of the generators: ask once, and only once even when a burst arrives first.
        async with self._catalog_lock:
            if self._catalog is None:
                self._catalog = await self._call(self._generator.describe)
        return self._catalog

    async def generate(self, job: GenerationJob) -> JobResult:
        return await self._call(self._generator.generate, job)

    async def _call(self, method, *args):
        try:
            return await method.remote(*args)
        except BackPressureError:
            raise ServiceOverloaded(self._config.retry_after_s) from None


def _log_medsd_info() -> None:
    """Replicas configure only Serve's own logger: give medsd's INFO lines (model, threads) a way out."""
    medsd_logger = logging.getLogger("medsd")
    if not medsd_logger.handlers:
        medsd_logger.addHandler(logging.StreamHandler())
        medsd_logger.setLevel(logging.INFO)


def build_app(cfg: ServeConfig) -> Application:
    """The bound application: generator replicas sized and batched by ``cfg`` behind one ingress."""
    backpressure = BackpressureConfig(status_code=OVERLOAD_STATUS, retry_after_s=cfg.retry_after_s)
    cfg_json = cfg.model_dump(mode="json")
    generator = Generator.options(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=backpressure,
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
    ).bind(cfg_json)
    return Ingress.options(
        ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        # Overload is the generators' to decide (their queue is the real limit); the ingress only bounds bursts,
        # and a small bound here would let the proxy refuse requests in a burst before they reach the ingress.
        max_queued_requests=cfg.ingress_max_ongoing_requests,
        backpressure_config=backpressure,
    ).bind(generator, cfg_json)
