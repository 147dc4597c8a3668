"""LoRA and textual-inversion files: how `medsd train` writes them and how a pipeline loads them.

Layouts (each readable by plain diffusers):
- LoRA: ``<dir>/pytorch_lora_weights.safetensors`` (UNet and optionally text-encoder layers, diffusers key
  names, LoraConfig in the safetensors metadata) -> ``pipe.load_lora_weights(dir)``.
- Textual inversion: diffusers' ``load_textual_inversion`` reads ONE token per file, so one placeholder per
  label means one file per label: ``<dir>/<label-slug>/learned_embeds.safetensors`` holding
  ``{token: (num_vectors, hidden)}``, plus ``<dir>/placeholder_tokens.json`` mapping each label to its token.
  A folder with ``learned_embeds.safetensors`` directly in it (one token) loads too.

Generation and serving call exactly :func:`load_adapters` (once, on a fresh pipeline) and
:func:`activate_adapter` (per request or per label).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medsd.config import AdapterConfig
from medsd.labels import label_slug

logger = logging.getLogger(__name__)

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # the name pipe.load_lora_weights looks for
LEARNED_EMBEDS_FILE = "learned_embeds.safetensors"  # the name pipe.load_textual_inversion looks for
PLACEHOLDER_TOKENS_FILE = "placeholder_tokens.json"
ADAPTER_HASHED_SUFFIXES = (".safetensors", ".json")
# Attribute on a loaded pipeline recording adapter name -> kind, so activate_adapter knows TI names too.
_LOADED_ADAPTERS_ATTRIBUTE = "medsd_adapters"


class AdapterKind(StrEnum):
    LORA = "lora"
    TEXTUAL_INVERSION = "textual_inversion"


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def save_lora(out_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> Path:
    """Write the peft LoRA layers of ``unet`` (and ``text_encoder`` when it has adapters) as
    ``<out_dir>/pytorch_lora_weights.safetensors`` in diffusers key format. Returns the file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers_and_metadata(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        # fp32 on the CPU whatever the training dtype: the file is the portable master copy.
        peft_state = get_peft_model_state_dict(module)
        state = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in peft_state.items()}
        return convert_state_dict_to_diffusers(state), module.peft_config["default"].to_dict()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet_layers, unet_metadata = layers_and_metadata(unet)
    text_layers, text_metadata = (None, None)
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        text_layers, text_metadata = layers_and_metadata(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_metadata,
        text_encoder_lora_adapter_metadata=text_metadata,
        safe_serialization=True,
    )
    return out_dir / LORA_WEIGHTS_FILE


def save_textual_inversion(out_dir: str | Path, embeddings: Mapping[str, tuple[str, torch.Tensor]]) -> list[Path]:
    """Write one ``<out_dir>/<label-slug>/learned_embeds.safetensors`` per label and ``placeholder_tokens.json``.

    ``embeddings``: label -> (placeholder token, (num_vectors, hidden) tensor). Returns the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for label, (token, vectors) in embeddings.items():
        if vectors.ndim != 2:
            raise ValueError(f"textual inversion {label!r}: expected (num_vectors, hidden), got {tuple(vectors.shape)}")
        folder = out_dir / label_slug(label)
        folder.mkdir(exist_ok=True)
        path = folder / LEARNED_EMBEDS_FILE
        save_file({token: vectors.detach().to("cpu", torch.float32).contiguous()}, str(path))
        files.append(path)
    tokens = {label: token for label, (token, _vectors) in embeddings.items()}
    (out_dir / PLACEHOLDER_TOKENS_FILE).write_text(json.dumps(tokens, indent=2) + "\n")
    return files


def adapter_hash(path: str | Path) -> str:
    """Short sha256 of an adapter folder's weights and configs, by relative path (like models.model_hash)."""
    from medsd.models import files_hash

    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in ADAPTER_HASHED_SUFFIXES)
    return files_hash(root, files)


def placeholder_tokens(adapter_dir: str | Path) -> dict[str, str]:
    """label -> placeholder token of a textual-inversion output folder (from placeholder_tokens.json)."""
    path = Path(adapter_dir) / PLACEHOLDER_TOKENS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected a textual-inversion folder written by `medsd train`")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def adapter_kind(path: str | Path) -> AdapterKind:
    """What a folder holds: LoRA weights or textual-inversion embeddings; ValueError naming the folder otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path}: does not exist")
    if (path / LORA_WEIGHTS_FILE).is_file():
        return AdapterKind.LORA
    if _learned_embeds_files(path):
        return AdapterKind.TEXTUAL_INVERSION
    raise ValueError(
        f"adapter folder {path}: holds neither {LORA_WEIGHTS_FILE} nor {LEARNED_EMBEDS_FILE} "
        f"(directly or in <label>/ subfolders); point model.adapters[].path at a `medsd train` output"
    )


def _learned_embeds_files(path: Path) -> list[Path]:
    if (path / LEARNED_EMBEDS_FILE).is_file():
        return [path / LEARNED_EMBEDS_FILE]
    return sorted(path.glob(f"*/{LEARNED_EMBEDS_FILE}"))


def load_adapters(pipe, adapters: Sequence[AdapterConfig]) -> None:
    """Load every adapter into ``pipe`` (in place): LoRA under its name, textual-inversion tokens into the
    tokenizer and text encoder. Checks every adapter before loading any. No LoRA is active afterwards
    unless exactly one LoRA was loaded; use :func:`activate_adapter` to choose."""
    names = [adapter.name for adapter in adapters]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    problems = [f"model.adapters: duplicate names {duplicates}"] if duplicates else []
    kinds: dict[str, AdapterKind] = {}
    for index, adapter in enumerate(adapters):
        try:
            kinds[adapter.name] = adapter_kind(adapter.path)
        except (ValueError, FileNotFoundError) as error:
            problems.append(f"model.adapters[{index}] ({adapter.name}): {error}")
    if problems:
        raise ValueError("; ".join(problems))
    loaded = getattr(pipe, _LOADED_ADAPTERS_ATTRIBUTE, {})
    for adapter in adapters:
        if adapter.name in loaded:
            raise ValueError(f"adapter {adapter.name!r} is already loaded into this pipeline")
        if kinds[adapter.name] is AdapterKind.LORA:
            pipe.load_lora_weights(adapter.path, adapter_name=adapter.name, local_files_only=True)
        else:
            for embeds in _learned_embeds_files(Path(adapter.path)):
                pipe.load_textual_inversion(str(embeds.parent), weight_name=LEARNED_EMBEDS_FILE, local_files_only=True)
        loaded[adapter.name] = kinds[adapter.name]
        logger.info("loaded %s adapter %r from %s", kinds[adapter.name], adapter.name, adapter.path)
    setattr(pipe, _LOADED_ADAPTERS_ATTRIBUTE, loaded)
    lora_names = [name for name, kind in loaded.items() if kind is AdapterKind.LORA]
    if len(lora_names) > 1:
        pipe.disable_lora()  # several LoRAs stacked would mix diseases; the caller picks one per request


def loaded_adapters(pipe) -> dict[str, AdapterKind]:
    """name -> kind of the adapters :func:`load_adapters` put into ``pipe``."""
    return dict(getattr(pipe, _LOADED_ADAPTERS_ATTRIBUTE, {}))


def activate_adapter(pipe, name: str | None) -> None:
    """Make ``name`` the only active LoRA, or switch every LoRA off for None or a textual-inversion name
    (its tokens act only where a prompt uses them). ValueError naming the loaded adapters otherwise."""
    loaded = loaded_adapters(pipe)
    if name is not None and name not in loaded:
        known = ", ".join(sorted(loaded)) or "none"
        raise ValueError(f"adapter {name!r} is not loaded; loaded adapters: {known}")
    has_lora = any(kind is AdapterKind.LORA for kind in loaded.values())
    if name is not None and loaded[name] is AdapterKind.LORA:
        pipe.enable_lora()
        pipe.set_adapters([name])
    elif has_lora:
        pipe.disable_lora()


def read_learned_embeds(path: str | Path) -> dict[str, torch.Tensor]:
    """token -> (num_vectors, hidden) tensor of one learned_embeds.safetensors file."""
    return load_file(str(path))
