"""medsd.models: device/dtype choice, the tiny tokenizer, the tiny model build, loading, saving, hashing."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTokenizer

from medsd import models
from medsd.config import ModelConfig
from medsd.labels import CHEXPERT_OBSERVATIONS
from medsd.phantom import render_phantom_images

SD_DEFAULT_SCALING_FACTOR = 0.18215  # what a copied SD config would say; the tiny VAE must have measured its own
HELDOUT_SEED = 424242  # a phantom seed the build never trains on
HELDOUT_IMAGES = 32
MIN_PSNR_DB = 25.0
SCALING_TOLERANCE = 0.1  # relative; the build measured 1/std on its own training images, we on fresh ones
PROMPT = "a frontal PA chest x-ray showing cardiomegaly"


def _sample(pipe: StableDiffusionPipeline, seed: int, prompt: str = PROMPT) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe([prompt], num_inference_steps=2, guidance_scale=4.0, generator=[generator], output_type="np").images


def _tiny_cfg(tiny_model_dir: Path, **fields) -> ModelConfig:
    return ModelConfig(model="tiny", cache_dir=str(tiny_model_dir.parent), device="cpu", **fields)


def _phantom_pixels(n: int, seed: int) -> torch.Tensor:
    images, _labels = render_phantom_images(n, models.TINY_IMAGE_SIZE_PX, seed)
    return models.grayscale_to_pixels(images)


# --- device and dtype -------------------------------------------------------------------------------------------


def test_auto_device_is_cpu_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.select_device("auto") == torch.device("cpu")
    assert models.select_device("cpu") == torch.device("cpu")


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"model.device='cuda'.*no CUDA GPU.*auto.*cpu"):
        models.select_device("cuda")


@pytest.mark.parametrize(
    ("precision", "expected"), [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_cpu_dtypes(precision, expected):
    assert models.select_dtype(torch.device("cpu"), precision) == expected


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match=r"fp16.*not supported on CPU.*bf16 or fp32"):
        models.select_dtype(torch.device("cpu"), "fp16")


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_cuda(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert models.select_dtype(torch.device("cuda"), "auto") == expected


def test_bf16_on_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="does not support bfloat16"):
        models.select_dtype(torch.device("cuda"), "bf16")


def test_autocast_dtype_is_none_for_fp32():
    assert models.autocast_dtype(torch.device("cpu"), "auto") is None
    assert models.autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


# --- tokenizer -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return models.build_tokenizer()


def test_prompt_words_are_single_tokens(tokenizer):
    for word in [*models.PROMPT_WORDS, "cardiomegaly", "effusion", "no", "finding", "frontal", "chest"]:
        tokens = tokenizer.tokenize(word)
        assert tokens == [word + "</w>"], word


def test_tokenizer_vocabulary_is_bytes_words_and_specials(tokenizer):
    byte_tokens = 2 * 256  # each byte character alone and with </w>
    assert len(tokenizer) == byte_tokens + len(models.learn_word_merges(models.PROMPT_WORDS)) + 2
    assert tokenizer.model_max_length == models.MAX_PROMPT_TOKENS
    assert tokenizer.convert_ids_to_tokens([tokenizer.bos_token_id, tokenizer.eos_token_id]) == [
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    padded = tokenizer("a chest x-ray", padding="max_length", max_length=tokenizer.model_max_length)
    assert len(padded.input_ids) == models.MAX_PROMPT_TOKENS


def test_every_label_prompt_encodes_differently(tokenizer):
    prompts = [f"a chest x-ray showing {observation.lower()}" for observation in CHEXPERT_OBSERVATIONS]
    encoded = [tuple(tokenizer(prompt).input_ids) for prompt in prompts]
    assert len(set(encoded)) == len(prompts)
    cardiomegaly = tokenizer("a chest x-ray showing cardiomegaly").input_ids
    effusion = tokenizer("a chest x-ray showing pleural effusion").input_ids
    assert cardiomegaly[:-2] == effusion[:-3]  # same prefix, then one whole-word token vs two
    assert tokenizer.convert_ids_to_tokens(effusion[-3:-1]) == ["pleural</w>", "effusion</w>"]


def test_unknown_words_fall_back_to_bytes(tokenizer):
    ids = tokenizer("sks pneumomediastinum", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "sks pneumomediastinum"


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    prompt = "A Frontal PA Chest X-Ray showing Edema and Pleural Effusion"
    for loaded in (CLIPTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert len(loaded) == len(tokenizer)
        assert loaded.model_max_length == models.MAX_PROMPT_TOKENS
        assert loaded(prompt).input_ids == tokenizer(prompt).input_ids


def test_merges_are_deterministic():
    assert models.learn_word_merges(models.PROMPT_WORDS) == models.learn_word_merges(models.PROMPT_WORDS[::-1])


# --- cache location --------------------------------------------------------------------------------------------


def test_cache_root_prefers_argument_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSD_CACHE_DIR", str(tmp_path / "env"))
    assert models.cache_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert models.cache_root(None) == tmp_path / "env"
    monkeypatch.delenv("MEDSD_CACHE_DIR")
    assert models.cache_root(None) == Path.home() / ".cache" / "medsd"


# --- building once, atomically ---------------------------------------------------------------------------------


def _fake_build(calls: list[int], fail: bool = False):
    def build_into(folder: Path) -> None:
        calls.append(1)
        time.sleep(0.2)  # long enough for a second caller to arrive while the first builds
        (folder / "model_index.json").write_text("{}")
        if fail:
            raise RuntimeError("simulated crash mid-build")
        (folder / "build_info.json").write_text("{}")

    return build_into


def test_concurrent_callers_build_once(monkeypatch, tmp_path):
    calls: list[int] = []
    monkeypatch.setattr(models, "_build_tiny_into", _fake_build(calls))
    with ThreadPoolExecutor(max_workers=2) as pool:  # flock also excludes two open() of one file in a process
        folders = list(pool.map(models.tiny_model_dir, [str(tmp_path)] * 2))
    assert calls == [1]
    assert folders == [tmp_path / models.tiny_model_name()] * 2
    assert sorted(p.name for p in (tmp_path / models.tiny_model_name()).iterdir()) == [
        "build_info.json",
        "model_index.json",
    ]


def test_crashed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_build_tiny_into", _fake_build([], fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.tiny_model_dir(str(tmp_path))
    assert not (tmp_path / models.tiny_model_name()).exists()
    assert not list(tmp_path.glob(f".{models.tiny_model_name()}-build-*"))


# --- the tiny model --------------------------------------------------------------------------------------------


def test_tiny_model_layout_and_build_record(tiny_model_dir):
    assert tiny_model_dir.name == models.tiny_model_name()
    for component in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_dir / component).exists(), component
    assert not list(tiny_model_dir.rglob("*.bin"))
    info = json.loads((tiny_model_dir / "build_info.json").read_text())
    assert info["recipe"] == models.tiny_model_name()
    assert info["vae"]["heldout_psnr_db"] >= MIN_PSNR_DB
    assert "not diagnostic" in (tiny_model_dir / "model_card.md").read_text()
    assert not list(tiny_model_dir.parent.glob(f".{models.tiny_model_name()}-build-*"))  # no staging left


def test_tiny_model_is_reused_not_rebuilt(tiny_model_dir):
    build_info = tiny_model_dir / "build_info.json"
    before = build_info.stat().st_mtime_ns
    assert models.tiny_model_dir(str(tiny_model_dir.parent)) == tiny_model_dir
    assert models.resolve_model_dir("tiny", str(tiny_model_dir.parent)) == str(tiny_model_dir)
    assert build_info.stat().st_mtime_ns == before


def test_plain_diffusers_loads_the_tiny_model(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.safety_checker is None


def test_load_pipeline_samples_64px_reproducibly(tiny_model_dir):
    pipe = models.load_pipeline(_tiny_cfg(tiny_model_dir))
    assert pipe.device == torch.device("cpu")
    assert pipe.dtype == torch.float32
    first = _sample(pipe, seed=7)
    assert first.shape == (1, models.TINY_IMAGE_SIZE_PX, models.TINY_IMAGE_SIZE_PX, 3)
    np.testing.assert_array_equal(first, _sample(pipe, seed=7))
    assert not np.array_equal(first, _sample(pipe, seed=8))


@pytest.mark.parametrize("sampler", list(models.SAMPLERS))
def test_every_sampler_runs(tiny_model_dir, sampler):
    pipe = models.load_pipeline(_tiny_cfg(tiny_model_dir), sampler=sampler)
    assert type(pipe.scheduler) is models.SAMPLERS[sampler]
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert np.isfinite(_sample(pipe, seed=0)).all()


def test_unknown_sampler_names_the_valid_ones(tiny_model_dir):
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'.*ddim, dpm\+\+, euler"):
        models.load_pipeline(_tiny_cfg(tiny_model_dir), sampler="plms")


def test_bf16_pipeline_on_cpu(tiny_model_dir):
    pipe = models.load_pipeline(_tiny_cfg(tiny_model_dir, precision="bf16"))
    assert pipe.unet.dtype == torch.bfloat16
    assert np.isfinite(_sample(pipe, seed=0)).all()


def test_vae_reconstructs_heldout_phantoms(tiny_model_dir):
    vae = models.load_components(tiny_model_dir).vae
    pixels = _phantom_pixels(HELDOUT_IMAGES, HELDOUT_SEED)  # (N, 3, 64, 64) in [-1, 1]
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((reconstruction - pixels) / 2).pow(2).mean().item()  # on the [0, 1] scale
    assert 10 * math.log10(1 / mse) >= MIN_PSNR_DB
    assert reconstruction.shape == pixels.shape


def test_scaling_factor_is_measured(tiny_model_dir):
    vae = models.load_components(tiny_model_dir).vae
    assert not math.isclose(vae.config.scaling_factor, SD_DEFAULT_SCALING_FACTOR, rel_tol=0.05)
    with torch.no_grad():
        latents = vae.encode(_phantom_pixels(HELDOUT_IMAGES, HELDOUT_SEED + 1)).latent_dist.sample()
    assert latents.shape[1:] == (4, 16, 16)
    assert math.isclose(vae.config.scaling_factor, 1 / latents.std().item(), rel_tol=SCALING_TOLERANCE)
    recorded = json.loads((tiny_model_dir / "build_info.json").read_text())["vae"]["scaling_factor"]
    assert math.isclose(vae.config.scaling_factor, recorded, rel_tol=1e-6)


def test_load_components_for_training(tiny_model_dir):
    parts = models.load_components(tiny_model_dir)
    assert parts.text_encoder.config.vocab_size == len(parts.tokenizer)
    assert isinstance(parts.noise_scheduler, DDPMScheduler)
    assert parts.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert parts.unet.dtype == torch.float32


def test_save_and_load_round_trip(tiny_model_dir, tmp_path):
    pipe = models.load_pipeline(_tiny_cfg(tiny_model_dir))
    out = models.save_pipeline(pipe, tmp_path / "copy", model_card="# copy\n")
    assert (out / "model_card.md").read_text() == "# copy\n"
    assert not list(out.rglob("*.bin"))
    reloaded = models.load_pipeline(ModelConfig(model=str(out), device="cpu"))
    np.testing.assert_array_equal(_sample(pipe, seed=3), _sample(reloaded, seed=3))
    assert reloaded.vae.config.scaling_factor == pipe.vae.config.scaling_factor


# --- refusing what is not a safetensors pipeline ---------------------------------------------------------------


def test_pickle_only_component_is_refused(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    (model_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(model_dir / "unet", safe_serialization=False)
    assert (model_dir / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model\.bin.*pickle.*safe_serialization=True"):
        models.resolve_model_dir(str(model_dir))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin"):
        models.load_pipeline(ModelConfig(model=str(model_dir), device="cpu"))


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        models.resolve_model_dir(str(tmp_path))


def test_broken_model_index_and_plain_file_are_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_index.json: not valid JSON"):
        models.resolve_model_dir(str(tmp_path))
    with pytest.raises(ValueError, match="is a file; expected a diffusers pipeline folder"):
        models.resolve_model_dir(str(tmp_path / "model_index.json"))


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        models.resolve_model_dir(str(tmp_path / "nowhere" / "model"))


def test_hub_id_in_local_cache_resolves_to_its_snapshot(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The Hugging Face cache layout: models--org--name/refs/main names the snapshot folder.
    repo = tmp_path / "hub" / "models--medsd-tests--tiny"
    commit = "0" * 40
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    resolved = models.resolve_model_dir("medsd-tests/tiny")
    assert Path(resolved) == repo / "snapshots" / commit
    assert models.model_hash(resolved) == models.model_hash(tiny_model_dir)


def test_uncached_hub_id_is_not_downloaded():
    with pytest.raises(FileNotFoundError, match=r"medsd-tests/not-a-cached-model.*does not download"):
        models.resolve_model_dir("medsd-tests/not-a-cached-model")


# --- content hash ----------------------------------------------------------------------------------------------


def test_hash_is_stable_across_copies_and_follows_weights(tiny_model_dir, tmp_path):
    original = models.model_hash(tiny_model_dir)
    assert len(original) == models.HASH_HEX_CHARS
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert models.model_hash(copy) == original

    (copy / "model_card.md").write_text("edited card\n")  # metadata, not the model
    assert models.model_hash(copy) == original

    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert models.model_hash(copy) != original
    assert models.model_hash(tiny_model_dir) == original


def test_hashes_of_distinct_models_differ(tiny_model_dir, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)
    other = models.save_pipeline(pipe, tmp_path / "other")
    assert models.model_hash(other) != models.model_hash(tiny_model_dir)


def test_label_prompts_differ_in_text_embeddings(tiny_model_dir):
    parts = models.load_components(tiny_model_dir)
    prompts = [f"a chest x-ray showing {o.lower()}" for o in ("Cardiomegaly", "Pleural Effusion", "Edema")]
    ids = parts.tokenizer(
        prompts, padding="max_length", max_length=models.MAX_PROMPT_TOKENS, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        states = parts.text_encoder(ids).last_hidden_state  # (3, 77, 32)
    for a, b in itertools.combinations(range(len(prompts)), 2):
        assert not torch.allclose(states[a], states[b])
