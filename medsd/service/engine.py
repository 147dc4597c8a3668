"""The generator replica's pipeline: load once, describe what it serves, run batches of jobs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from medsd.adapters import activate_adapter, loaded_adapters
from medsd.config import ServeConfig
from medsd.models import SAMPLERS, check_sampler, load_pipeline, make_scheduler, model_hash, resolve_model_dir
from medsd.sampling import sample_images
from medsd.service.batching import BatchKey, GenerationJob, JobResult, run_batch
from medsd.service.schema import AdapterInfo, Catalog

logger = logging.getLogger(__name__)


class GenerationEngine:
    """A loaded pipeline plus one scheduler per sampler; not thread-safe (run one batch at a time)."""

    def __init__(self, cfg: ServeConfig):
        check_sampler(cfg.default_sampler)
        self._cfg = cfg
        self._pipe = load_pipeline(cfg.model)
        self._model_hash = model_hash(resolve_model_dir(cfg.model.model, cfg.model.cache_dir))
        # Built once from the model's own scheduler config, so every sampler keeps its betas and spacing.
        self._schedulers = {name: make_scheduler(name, self._pipe.scheduler.config) for name in SAMPLERS}
        self._adapters = loaded_adapters(self._pipe)
        missing = [adapter.name for adapter in cfg.model.adapters if adapter.name not in self._adapters]
        if missing:
            raise RuntimeError(f"model.adapters {missing} were configured but the pipeline did not load them")
        # What diffusers draws when no height/width is given: the UNet's latent size times the VAE's scale.
        native_px = self._pipe.unet.config.sample_size * self._pipe.vae_scale_factor
        self._sizes = [(native_px, native_px)]
        logger.info(
            "generator ready: model %s (hash %s), %d px, %d torch threads",
            cfg.model.model,
            self._model_hash,
            native_px,
            torch.get_num_threads(),
        )

    def describe(self) -> Catalog:
        return Catalog(
            model=self._cfg.model.model,
            model_hash=self._model_hash,
            sizes=self._sizes,
            samplers=list(SAMPLERS),
            adapters=[AdapterInfo(name=name, kind=str(kind)) for name, kind in self._adapters.items()],
            default_steps=self._cfg.default_steps,
            default_guidance_scale=self._cfg.default_guidance_scale,
            default_sampler=self._cfg.default_sampler,
        )

    def run(self, jobs: Sequence[GenerationJob]) -> list[JobResult]:
        """One Serve batch: one pipeline call per group of shared settings; results in job order."""
        return run_batch(jobs, self._sample_group, self._model_hash)

    def _sample_group(self, key: BatchKey, prompts: list[str], seeds: list[int]) -> np.ndarray:
        if (key.height, key.width) not in self._sizes:
            raise ValueError(f"height x width {key.height}x{key.width}: not served; expected one of {self._sizes}")
        self._pipe.scheduler = self._schedulers[key.sampler]
        activate_adapter(self._pipe, key.adapter)
        return sample_images(
            self._pipe,
            prompts,
            seeds,
            steps=key.steps,
            guidance_scale=key.guidance_scale,
            negative_prompt=key.negative_prompt or None,
        )
