"""Build, load and save Stable Diffusion pipelines, and choose their device and dtype.

The only module that calls ``StableDiffusionPipeline.from_pretrained`` or sets the VAE's latent
scaling factor. A model is a diffusers pipeline folder with safetensors weights: the embedded
``"tiny"`` model (built from configs in code, VAE trained on phantom radiographs, cached once), a
local folder, or a hub id already in the local Hugging Face cache. medsd never downloads weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from medsd.adapters import load_adapters
from medsd.config import ModelConfig
from medsd.labels import CHEXPERT_OBSERVATIONS, PROJECTIONS, VIEWS

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Device and dtype
# ---------------------------------------------------------------------------------------------------------------

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(requested: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a ValueError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"model.device='cuda' but torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False);"
            " use model.device=auto or model.device=cpu"
        )
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"model.device={requested!r}: expected auto, cpu or cuda")
    return torch.device(requested)


def select_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Weights dtype: 'auto' is fp32 on CPU and bf16 (fp16 where bf16 is unsupported) on CUDA.

    fp16 on CPU is refused rather than silently downgraded: CPU half kernels are slow or missing
    (GroupNorm, conv), so the user should choose bf16 or fp32 knowingly.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"model.precision={precision!r}: expected auto, {', '.join(PRECISION_DTYPES)}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError(
            "model.precision='fp16' is not supported on CPU (slow or missing half kernels); use bf16 or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("model.precision='bf16' but this GPU does not support bfloat16; use fp16 or fp32")
    return PRECISION_DTYPES[precision]


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype training runs under ``torch.autocast`` (fp32 master weights), or None for plain fp32."""
    dtype = select_dtype(device, precision)
    return None if dtype == torch.float32 else dtype


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer of the tiny model
# ---------------------------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"  # CLIP's BPE marks the last symbol of a word with this suffix
MAX_PROMPT_TOKENS = 77  # SD's text context length; without it transformers defaults to ~1e30 and padding breaks

# Words the prompts use (prompts.py, labels.py) get whole-word tokens so that labels encode to clearly
# different ids. "x-ray" is three pre-tokens in CLIP ("x", "-", "ray"), hence "ray".
PROMPT_WORDS = tuple(
    sorted(
        {word for name in CHEXPERT_OBSERVATIONS for word in name.lower().split()}
        | {view.lower() for view in VIEWS}
        | {projection.lower() for projection in PROJECTIONS}
        | set("a chest x-ray ray xray showing with and of radiograph male female year old uncertain possible".split())
        - {"x-ray"}
    )
)


def learn_word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, learnt greedily on ``words``, until every word is one symbol.

    Ties break on the pair itself, so the list is deterministic. Returns merges in rank order.
    """
    words_as_symbols = [tuple(word[:-1]) + (word[-1] + END_OF_WORD,) for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts = Counter(pair for symbols in words_as_symbols for pair in zip(symbols, symbols[1:], strict=False))
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        words_as_symbols = [_merge_pair(symbols, best) for symbols in words_as_symbols]


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def build_tokenizer(words: Sequence[str] = PROMPT_WORDS) -> CLIPTokenizer:
    """A CLIP tokenizer with no hub: the 256 byte characters (alone and with ``</w>``), merges that
    make each of ``words`` one token, then the two special tokens (CLIP's own vocabulary order).

    RuntimeError if some word does not come out as a single token.
    """
    byte_chars = list(bytes_to_unicode().values())
    merges = learn_word_merges(words)
    vocab: dict[str, int] = {}
    for token in [
        *byte_chars,
        *(c + END_OF_WORD for c in byte_chars),
        *(a + b for a, b in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]:
        vocab.setdefault(token, len(vocab))
    # transformers v5: vocab=/merges= objects; the old vocab_file= keywords are silently ignored.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"tokenizer merges do not make single tokens of {split}; check learn_word_merges")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# The tiny model: recipe
# ---------------------------------------------------------------------------------------------------------------

# Bump whenever anything below changes what gets built: the cache folder is named after it, so it rebuilds.
# The phantom's own format version joins it in the folder name (tiny_model_name): its drawings train the VAE.
TINY_RECIPE_VERSION = "tiny-v2"
TINY_IMAGE_SIZE_PX = 64  # pixels; the VAE's 3 downsamplings make 16x16x4 latents
TEXT_HIDDEN_SIZE = 32  # CLIP width, also the UNet's cross-attention width
TINY_INIT_SEED = 0  # seeds the random init of text encoder, UNet and VAE

# VAE training on phantom radiographs (notes/diffusers-offline.md: small batches and more steps win).
VAE_TRAIN_IMAGES = 1024
VAE_TRAIN_SEED = 9101  # phantom seed of the training images
VAE_HELDOUT_IMAGES = 64
VAE_HELDOUT_SEED = 9102  # phantom seed of the held-out images the build's PSNR is measured on
VAE_STEPS = 500  # held-out PSNR 29.7-31.0 dB over two init seeds (300: 27.3, 700: 31.3); ~70 s alone on 2 cores
VAE_BATCH_SIZE = 8
VAE_LEARNING_RATE = 2e-3
VAE_WARMUP_STEPS = 20
VAE_KL_WEIGHT = 1e-6  # just enough to keep the posterior well-defined; reconstruction dominates
VAE_LOG_EVERY = 50  # steps
VAE_MIN_PSNR_DB = 25.0  # a build below this reconstructs too poorly to be worth caching
ENCODE_BATCH_SIZE = 64  # images per forward pass when measuring latents and PSNR


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer, 32-wide CLIP text encoder with random weights (frozen in the tiny recipe) for ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),  # textual inversion resizes the embedding to the tokenizer's length
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        # The pooled output finds the sequence end by eos_token_id, so it must be this tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    """The ~2.2M-parameter UNet verified to learn 16x16x4 phantom latents on 2 CPU cores.

    Widths 48/96 rather than 32/64: 1.3x the time per step, and in the same training time (2000 steps
    instead of 3000) bench/quality.py's synthetic-only AUC rose from 0.879 to 0.895.
    """
    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE_PX // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(48, 96),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_vae() -> AutoencoderKL:
    """An untrained 650k-parameter VAE: 64 px RGB -> 16x16x4 latents, no mid-block attention (too slow)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE_PX,
        mid_block_add_attention=False,
    )


def build_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule (SD 1.x scheduler_config.json)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def grayscale_to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) radiographs -> float32 (N, 3, H, W) in [-1, 1], the gray copied to 3 channels."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    pixels = torch.from_numpy(images).float().div(127.5).sub(1.0)  # (N, H, W)
    return pixels[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W)


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, steps: int, seed: int) -> float:
    """Train ``vae`` in place on ``pixels`` (N, 3, H, W) in [-1, 1]: MSE + small KL, AdamW, cosine.

    Returns the mean loss over the last logging window.
    """
    if steps < 1:
        raise ValueError(f"VAE steps: got {steps}; expected at least 1")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LEARNING_RATE)
    schedule = get_cosine_schedule_with_warmup(optimizer, VAE_WARMUP_STEPS, steps)
    vae.train()
    order = torch.randperm(len(pixels), generator=generator)
    cursor, window = 0, []
    for step in range(1, steps + 1):
        # Next batch: walk a permutation, reshuffling each epoch (no flips or crops: laterality is anatomy).
        if cursor + VAE_BATCH_SIZE > len(order):
            order, cursor = torch.randperm(len(pixels), generator=generator), 0
        batch = pixels[order[cursor : cursor + VAE_BATCH_SIZE]]  # (B, 3, H, W)
        cursor += VAE_BATCH_SIZE

        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + VAE_KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

        window.append(loss.item())
        if step % VAE_LOG_EVERY == 0 or step == steps:
            logger.info("tiny VAE step %d/%d loss %.5f", step, steps, sum(window) / len(window))
            last_window_loss, window = sum(window) / len(window), []
    vae.eval()
    return last_window_loss


@torch.no_grad()
def measure_latent_std(vae: AutoencoderKL, pixels: torch.Tensor, seed: int) -> float:
    """Std of posterior samples over ``pixels``: SD scales latents by 1/std so the UNet sees unit variance."""
    generator = torch.Generator().manual_seed(seed)
    latents = [vae.encode(batch).latent_dist.sample(generator=generator) for batch in pixels.split(ENCODE_BATCH_SIZE)]
    return torch.cat(latents).std().item()


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """PSNR in dB of decode(mode(encode(x))) over ``pixels`` in [-1, 1], peak 1 on the [0, 1] scale."""
    squared_error, count = 0.0, 0
    for batch in pixels.split(ENCODE_BATCH_SIZE):
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mode()).sample.clamp(-1, 1)
        squared_error += ((reconstruction - batch) / 2).pow(2).sum().item()  # /2: [-1, 1] -> [0, 1] scale
        count += batch.numel()
    return 10 * math.log10(count / squared_error)


def _render_phantom_pixels(n: int, seed: int) -> torch.Tensor:
    from medsd.phantom import render_phantom_images  # heavy drawing code, only needed when building

    images, _labels = render_phantom_images(n, TINY_IMAGE_SIZE_PX, seed)
    return grayscale_to_pixels(images)


def build_tiny_pipeline() -> tuple[StableDiffusionPipeline, dict]:
    """Build the tiny pipeline: random frozen text encoder and UNet, VAE trained on phantoms.

    Returns the pipeline and its build record (settings, PSNR, scaling factor, seconds). Deterministic
    by seed up to floating-point differences between machines. RuntimeError if the VAE is too poor.
    """
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(TINY_INIT_SEED)
        text_encoder = build_text_encoder(tokenizer)
        unet = build_unet()
        vae = build_vae()

    train_pixels = _render_phantom_pixels(VAE_TRAIN_IMAGES, VAE_TRAIN_SEED)
    heldout_pixels = _render_phantom_pixels(VAE_HELDOUT_IMAGES, VAE_HELDOUT_SEED)
    vae_started = time.perf_counter()
    final_loss = train_vae(vae, train_pixels, VAE_STEPS, seed=TINY_INIT_SEED)
    vae_seconds = time.perf_counter() - vae_started
    psnr_db = reconstruction_psnr(vae, heldout_pixels)
    if psnr_db < VAE_MIN_PSNR_DB:
        raise RuntimeError(
            f"tiny VAE reconstructs held-out phantoms at {psnr_db:.1f} dB, below {VAE_MIN_PSNR_DB} dB; "
            "the recipe in medsd/models.py needs more VAE steps"
        )
    latent_std = measure_latent_std(vae, train_pixels, seed=TINY_INIT_SEED)
    vae.register_to_config(scaling_factor=1.0 / latent_std)  # measured, never SD's 0.18215

    parts = PipelineComponents(tokenizer, text_encoder.requires_grad_(False), vae, unet, build_scheduler())
    pipe = assemble_pipeline(parts, parts.noise_scheduler)
    build_info = {
        "recipe": tiny_model_name(),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "image_size_px": TINY_IMAGE_SIZE_PX,
        "tokenizer": {"vocab_size": len(tokenizer), "whole_word_tokens": list(PROMPT_WORDS)},
        "init_seed": TINY_INIT_SEED,
        "vae": {
            "train_images": VAE_TRAIN_IMAGES,
            "train_seed": VAE_TRAIN_SEED,
            "heldout_images": VAE_HELDOUT_IMAGES,
            "heldout_seed": VAE_HELDOUT_SEED,
            "steps": VAE_STEPS,
            "batch_size": VAE_BATCH_SIZE,
            "learning_rate": VAE_LEARNING_RATE,
            "kl_weight": VAE_KL_WEIGHT,
            "final_loss": round(final_loss, 6),
            "seconds": round(vae_seconds, 1),
            "heldout_psnr_db": round(psnr_db, 2),
            "latent_std": latent_std,
            "scaling_factor": vae.config.scaling_factor,
        },
        "parameters": {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }
    logger.info(
        "tiny model built in %.0f s: VAE held-out PSNR %.1f dB, scaling factor %.3f",
        build_info["seconds"],
        psnr_db,
        vae.config.scaling_factor,
    )
    return pipe, build_info


def _tiny_model_card(build_info: dict) -> str:
    vae = build_info["vae"]
    return f"""# medsd tiny Stable Diffusion ({build_info["recipe"]})

A Stable Diffusion pipeline small enough to train and sample on two CPU cores, built by
`medsd.models.build_tiny_pipeline` from configs in code, with no download.

- Images: {build_info["image_size_px"]} px, grayscale radiographs stored as 3 equal channels in [-1, 1].
- Tokenizer: byte-level CLIP vocabulary ({build_info["tokenizer"]["vocab_size"]} tokens) with whole-word tokens
  for the words of medsd prompts.
- Text encoder: 2-layer CLIP, width 32, random and frozen. UNet: ~2.2M parameters, random (untrained).
- VAE: trained {vae["steps"]} steps (batch {vae["batch_size"]}) on {vae["train_images"]} procedural phantom
  radiographs (seed {vae["train_seed"]}); held-out PSNR {vae["heldout_psnr_db"]} dB on {vae["heldout_images"]} images
  (seed {vae["heldout_seed"]}); latent scaling factor {vae["scaling_factor"]:.4f} measured as 1/std of the latents.
- Built {build_info["built_at"]} in {build_info["seconds"]} s with torch {build_info["versions"]["torch"]},
  diffusers {build_info["versions"]["diffusers"]}, transformers {build_info["versions"]["transformers"]}.

**Synthetic, not diagnostic.** Everything this model outputs is a synthetic image for software testing
and research. It has seen no patient data and must never be used for diagnosis or clinical decisions.
"""


# ---------------------------------------------------------------------------------------------------------------
# The tiny model: cache
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_CACHE_DIR = "~/.cache/medsd"
CACHE_DIR_ENV = "MEDSD_CACHE_DIR"
BUILD_INFO_FILE = "build_info.json"
MODEL_CARD_FILE = "model_card.md"


def cache_root(cache_dir: str | None) -> Path:
    """``cache_dir``, else $MEDSD_CACHE_DIR, else ~/.cache/medsd (read now, not at import)."""
    return Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def tiny_model_name() -> str:
    """Cache folder name of the tiny model: its recipe version plus the phantom format it was trained on."""
    from medsd.phantom import PHANTOM_FORMAT_VERSION

    return f"{TINY_RECIPE_VERSION}-phantom{PHANTOM_FORMAT_VERSION}"


def tiny_model_dir(cache_dir: str | None = None) -> Path:
    """The cached tiny model folder, built once when missing.

    Builds into a temporary sibling and renames it into place, so a crash never leaves half a model;
    a file lock makes concurrent callers (processes, Ray workers on one node) wait for one build.
    """
    root = cache_root(cache_dir)
    name = tiny_model_name()
    model_dir = root / name
    if (model_dir / BUILD_INFO_FILE).is_file():
        return model_dir
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{name}.lock"):
        if (model_dir / BUILD_INFO_FILE).is_file():  # another process built it while we waited
            return model_dir
        for stale in root.glob(f".{name}-build-*"):  # left by a crashed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("building the tiny model into %s (once; a few minutes on 2 CPU cores)", model_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=root))
        try:
            _build_tiny_into(staging)
            os.replace(staging, model_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return model_dir


def _build_tiny_into(folder: Path) -> None:
    """Build the tiny model and write it to ``folder``; build_info.json last, as the completion marker."""
    pipe, build_info = build_tiny_pipeline()
    save_pipeline(pipe, folder, model_card=_tiny_model_card(build_info))
    (folder / BUILD_INFO_FILE).write_text(json.dumps(build_info, indent=2) + "\n")


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------
# Resolving and validating a model folder
# ---------------------------------------------------------------------------------------------------------------

TINY_MODEL = "tiny"
MODEL_INDEX_FILE = "model_index.json"
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Components a medsd pipeline never loads (the safety checker blacks out radiographs).
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor")
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_dir(model: str, cache_dir: str | None = None) -> str:
    """'tiny' -> the cached tiny model (built if needed); a local folder -> validated; a hub id -> its
    snapshot in the local Hugging Face cache, validated. Never downloads.

    FileNotFoundError for a missing path or an uncached hub id; ValueError for a folder that is not a
    diffusers pipeline with safetensors weights.
    """
    if model == TINY_MODEL:
        return str(tiny_model_dir(cache_dir))
    path = Path(model).expanduser()
    if path.exists():
        validate_pipeline_dir(path)
        return str(path.resolve())  # absolute: Ray workers and actors run in other working directories
    if not HUB_ID_PATTERN.fullmatch(model):
        raise FileNotFoundError(f"model {model!r}: no such folder")
    snapshot = _cached_hub_snapshot(model)
    validate_pipeline_dir(snapshot)
    return str(snapshot)


def _cached_hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # local_files_only: resolve from the cache, never touch the network.
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r}: no local folder of that name, and not in the local Hugging Face cache. "
            "medsd does not download weights: fetch them yourself (e.g. `hf download "
            f"{repo_id}` with safetensors) or pass the path of a diffusers pipeline folder"
        ) from None


def validate_pipeline_dir(model_dir: Path) -> None:
    """ValueError unless ``model_dir`` is a diffusers pipeline folder whose model components have
    safetensors weights; pickle-only weights are refused, naming the file."""
    if not model_dir.is_dir():
        raise ValueError(f"model {model_dir}: is a file; expected a diffusers pipeline folder")
    index_path = model_dir / MODEL_INDEX_FILE
    if not index_path.is_file():
        raise ValueError(
            f"model {model_dir}: no {MODEL_INDEX_FILE}, so not a diffusers pipeline folder "
            "(save one with StableDiffusionPipeline.save_pretrained or medsd.models.save_pipeline)"
        )
    problems = []
    for component, (library, class_name) in _pipeline_components(model_dir).items():
        folder = model_dir / component
        if not folder.is_dir():
            problems.append(f"component folder {folder} is missing")
            continue
        if not (folder / "config.json").is_file():
            continue  # tokenizer or scheduler: configuration only, no weights
        if any(folder.glob("*.safetensors")):
            continue
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
        if pickles:
            problems.append(
                f"{pickles[0]} holds pickle weights, which medsd refuses to load (unpickling can run code); convert "
                f"it once, in a trusted environment, with `from {library} import {class_name}; "
                f"{class_name}.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}', "
                "safe_serialization=True)`"
            )
        else:
            problems.append(f"{folder} has a config.json but no .safetensors weights")
    if problems:
        raise ValueError(f"model {model_dir}: " + "; ".join(problems))


def _pipeline_components(model_dir: Path) -> dict[str, tuple[str, str]]:
    """Component folder -> (library, class) from model_index.json, for the components medsd loads."""
    try:
        index = json.loads((model_dir / MODEL_INDEX_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{model_dir / MODEL_INDEX_FILE}: not valid JSON ({error})") from None
    return {
        name: (value[0], value[1])
        for name, value in sorted(index.items())
        if not name.startswith("_")
        and name not in UNUSED_COMPONENTS
        and isinstance(value, list)
        and len(value) == 2
        and value[0] is not None
    }


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------------------------

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,  # algorithm_type defaults to dpmsolver++
    "euler": EulerDiscreteScheduler,
}


def check_sampler(name: str) -> None:
    """ValueError naming the valid samplers unless ``name`` is one of them."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of: {', '.join(SAMPLERS)}")


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """Sampler ``name`` built from an existing scheduler ``config`` (same betas and timestep spacing)."""
    check_sampler(name)
    return SAMPLERS[name].from_config(config)


def load_pipeline(cfg: ModelConfig, sampler: str | None = None) -> StableDiffusionPipeline:
    """The pipeline of ``cfg.model`` on the chosen device and dtype, safety checker off, progress bar off,
    with its scheduler swapped for ``sampler`` when given."""
    if sampler is not None:
        check_sampler(sampler)  # fail before the slow load
    device = select_device(cfg.device)
    dtype = select_dtype(device, cfg.precision)
    model_dir = resolve_model_dir(cfg.model, cfg.cache_dir)
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir,
        use_safetensors=True,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if sampler is not None:
        pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    load_adapters(pipe, cfg.adapters)  # before the cast and move, so adapter weights follow the pipeline's
    # Cast after loading, on the CPU before moving: from_pretrained's dtype keyword differs across the diffusers
    # versions we allow (torch_dtype before 0.42, deprecated for dtype since). Cast only when needed: to(dtype)
    # logs a warning even when no module must stay fp32.
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class PipelineComponents:
    """The parts training needs, loaded individually in fp32 on CPU; ``noise_scheduler`` is DDPM."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def assemble_pipeline(parts: PipelineComponents, scheduler) -> StableDiffusionPipeline:
    """A pipeline around ``parts`` (the modules themselves, not copies) sampling with ``scheduler``; no safety
    checker (radiographs, and it would need hub weights)."""
    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def native_image_size_px(model_dir: str | Path) -> int:
    """Side of the images a model folder's UNet was built for (sample_size latents, upsampled by the VAE)."""
    unet = UNet2DConditionModel.load_config(Path(model_dir) / "unet")
    return unet["sample_size"] * vae_downsampling(model_dir)


def vae_downsampling(model_dir: str | Path) -> int:
    """How many pixels one latent cell covers per side: each VAE block but the last halves the image."""
    vae = AutoencoderKL.load_config(Path(model_dir) / "vae")
    return 2 ** (len(vae["block_out_channels"]) - 1)


def load_components(model_dir: str | Path) -> PipelineComponents:
    """Load the components of a resolved model folder (see :func:`resolve_model_dir`) for training."""
    model_dir = Path(model_dir)
    validate_pipeline_dir(model_dir)
    weights = {"use_safetensors": True, "local_files_only": True}
    return PipelineComponents(
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(model_dir / "vae", **weights),
        unet=UNet2DConditionModel.from_pretrained(model_dir / "unet", **weights),
        noise_scheduler=DDPMScheduler.from_pretrained(model_dir / "scheduler", local_files_only=True),
    )


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: str | Path, model_card: str | None = None) -> Path:
    """Save ``pipe`` as a diffusers folder with safetensors weights, plus ``model_card.md`` when given."""
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if model_card is not None:
        (out_dir / MODEL_CARD_FILE).write_text(model_card)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Content hash
# ---------------------------------------------------------------------------------------------------------------

HASHED_SUFFIXES = (".json", ".safetensors", ".txt", ".model")  # configs, weights, tokenizer files
HASH_HEX_CHARS = 16  # 64 bits: plenty to tell models apart, short enough for file names and PNG text
HASH_CHUNK_BYTES = 1 << 20
_hash_cache: dict[tuple, str] = {}


def model_hash(model_dir: str | Path) -> str:
    """Short sha256 of what a pipeline loads: model_index.json and the configs, weights and tokenizer files of
    its components, by relative path. The same for any copy of the folder; model_card.md, build_info.json
    and pickle weights do not count. Cached per process by (path, size, mtime) of each file."""
    model_dir = Path(model_dir).resolve()
    validate_pipeline_dir(model_dir)
    files = [model_dir / MODEL_INDEX_FILE] + [
        path
        for component in _pipeline_components(model_dir)
        for path in sorted((model_dir / component).rglob("*"))
        if path.is_file() and path.suffix in HASHED_SUFFIXES
    ]
    return files_hash(model_dir, files)


def files_hash(root: Path, files: list[Path]) -> str:
    """Short sha256 of ``files`` by their path relative to ``root`` (so any copy of the folder hashes the same).

    Cached per process by (path, size, mtime) of each file."""
    relative = sorted((path.relative_to(root).as_posix(), path) for path in files)
    key = (str(root), tuple((name, path.stat().st_size, path.stat().st_mtime_ns) for name, path in relative))
    if key not in _hash_cache:
        digest = hashlib.sha256()
        for name, path in relative:
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())  # names and lengths frame the bytes
            with open(path, "rb") as handle:
                while chunk := handle.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
        _hash_cache[key] = digest.hexdigest()[:HASH_HEX_CHARS]
    return _hash_cache[key]
