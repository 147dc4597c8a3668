"""Prompts + seeds -> grayscale radiographs, one torch.Generator per image.

Every sampler path (demo grid, bulk generation, serving, validation grids) goes through
:func:`sample_images`, so an image's content depends only on its prompt, seed and settings, never on
the other images of its batch. Its last bits can: the math libraries pick kernels by batch shape, so
the same image sampled in a batch of a different size may differ by one grey level in a few pixels.
Byte-identical reruns need the same batch composition, which bulk generation fixes in its plan.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

# Distinct prompts a PromptEmbeddingCache keeps: a match plan has a few hundred finding combinations.
DEFAULT_CACHED_PROMPTS = 512


def sample_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    negative_prompt: str | None = None,
    embeddings: PromptEmbeddingCache | None = None,
) -> np.ndarray:
    """Run ``pipe`` once for the batch; return (N, H, W) uint8 grayscale images.

    Generators live on the CPU so that a seed gives the same starting noise on every device. With
    ``embeddings``, text-encoder outputs come from (and go into) that cache instead of being recomputed.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    if embeddings is None:
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        text_inputs = {"prompt": list(prompts), "negative_prompt": negative}
    else:
        prompt_embeds, negative_embeds = embeddings.lookup(pipe, prompts, negative_prompt or "")
        text_inputs = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}
    with torch.inference_mode():
        result = pipe(
            **text_inputs,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        )
    return to_grayscale_uint8(result.images)


class PromptEmbeddingCache:
    """Text-encoder outputs per distinct (prompt, negative prompt), computed once and reused across batches.

    Bulk plans repeat a few prompts thousands of times. Each prompt is encoded on its own, so its
    embedding never depends on which other prompts happened to be missing at the time (batch shape can
    move the last bits). Least-recently-used entries are dropped beyond ``max_prompts`` (an SD 1.x entry
    is 2 x 77 x 768 floats, about 0.5 MB). Entries belong to the text encoder as it was when they were
    computed: use one cache per adapter.
    """

    def __init__(self, max_prompts: int = DEFAULT_CACHED_PROMPTS) -> None:
        if max_prompts < 1:
            raise ValueError(f"max_prompts: got {max_prompts}; expected at least 1")
        self._max_prompts = max_prompts
        self._entries: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, pipe, prompts: Sequence[str], negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeddings, negative embeddings), each (N, tokens, width), for ``prompts`` in order."""
        for prompt in dict.fromkeys(p for p in prompts if (p, negative_prompt) not in self._entries):
            with torch.inference_mode():
                # Always encode the negative too, so one entry serves any guidance scale.
                encoded, negative = pipe.encode_prompt(
                    [prompt],
                    device=pipe._execution_device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=True,
                    negative_prompt=[negative_prompt],
                )
            self._entries[(prompt, negative_prompt)] = (encoded[0], negative[0])  # (tokens, width) each
        keys = [(p, negative_prompt) for p in prompts]
        for key in dict.fromkeys(keys):
            self._entries.move_to_end(key)
        batch = (
            torch.stack([self._entries[key][0] for key in keys]),  # (N, tokens, width)
            torch.stack([self._entries[key][1] for key in keys]),
        )
        while len(self._entries) > self._max_prompts:
            self._entries.popitem(last=False)
        return batch


def to_grayscale_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> (N, H, W) uint8; radiographs are one channel stored as three."""
    gray = np.asarray(images, dtype=np.float32).mean(axis=-1)
    return np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)
