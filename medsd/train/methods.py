"""What learns and how it is saved: DreamBooth, LoRA and textual inversion as small strategy objects.

The loop is the same for all three; a method decides, once at construction, which weights train
(``parameter_groups``), whether anything follows an optimizer step (``after_optimizer_step``), what a
checkpoint stores (``trained_state`` / ``load_trained_state``) and what the output folder holds (``save``).
Trained weights stay fp32 (the master copy); frozen weights may be cast to the autocast dtype on a GPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import peft
import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from medsd.adapters import save_lora, save_textual_inversion
from medsd.config import TrainConfig
from medsd.models import MODEL_INDEX_FILE, PipelineComponents, assemble_pipeline, make_scheduler, save_pipeline
from medsd.train.conditioning import placeholder_vectors
from medsd.train.objective import weighted_mse

logger = logging.getLogger(__name__)

UNET_PREFIX = "unet."
TEXT_ENCODER_PREFIX = "text_encoder."


def validation_pipeline(parts: PipelineComponents, sampler: str) -> StableDiffusionPipeline:
    """The pipeline validation grids sample with: the trained modules and ``sampler`` on the training noise
    schedule (same betas and prediction type)."""
    pipe = assemble_pipeline(parts, make_scheduler(sampler, parts.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Method:
    """Defaults the three methods share; each subclass says what trains."""

    name = ""

    def __init__(self, cfg: TrainConfig, parts: PipelineComponents) -> None:
        self.cfg = cfg
        self.parts = parts
        parts.vae.requires_grad_(False).eval()

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules with trained weights, by component name (the loop wraps these for data parallelism)."""
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """AdamW parameter groups: trained parameters and their learning rates."""
        raise NotImplementedError

    def trained_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, out_dir: Path, base_model_dir: Path) -> None:
        """Write the method's output files into ``out_dir`` (which exists)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.parameter_groups() for p in group["params"]]

    loss = staticmethod(weighted_mse)

    def after_optimizer_step(self) -> None:
        """Hook after each optimizer step (textual inversion restores the rows that must not learn)."""

    def enable_gradient_checkpointing(self) -> None:
        for name, module in self.trainable_modules().items():
            if name == "unet":
                module.enable_gradient_checkpointing()
            else:
                module.gradient_checkpointing_enable()

    def set_train_mode(self, is_training: bool) -> None:
        """Trained modules in train mode while training (eval for validation); frozen ones always eval."""
        trained = self.trainable_modules()
        for name in ("unet", "text_encoder"):
            getattr(self.parts, name).train(is_training and name in trained)

    def cast_frozen_weights(self, dtype: torch.dtype) -> None:
        """Cast fully frozen modules (not the VAE: SD's VAE overflows in fp16) to ``dtype`` to save memory."""
        trained = self.trainable_modules()
        for name in ("unet", "text_encoder"):
            if name not in trained:
                getattr(self.parts, name).to(dtype=dtype)

    def _text_encoder_learning_rate(self) -> float:
        return self.cfg.optim.text_encoder_learning_rate or self.cfg.optim.learning_rate


class DreamBooth(_Method):
    """The whole UNet learns (and the text encoder with ``train_text_encoder``); saves a diffusers folder."""

    name = "dreambooth"

    def __init__(self, cfg: TrainConfig, parts: PipelineComponents) -> None:
        super().__init__(cfg, parts)
        parts.unet.requires_grad_(True)
        parts.text_encoder.requires_grad_(cfg.train_text_encoder)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.parts.unet}
        if self.cfg.train_text_encoder:
            modules["text_encoder"] = self.parts.text_encoder
        return modules

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": list(self.parts.unet.parameters()), "lr": self.cfg.optim.learning_rate}]
        if self.cfg.train_text_encoder:
            groups.append(
                {"params": list(self.parts.text_encoder.parameters()), "lr": self._text_encoder_learning_rate()}
            )
        return groups

    def trained_state(self) -> dict[str, torch.Tensor]:
        state = {UNET_PREFIX + k: v for k, v in self.parts.unet.state_dict().items()}
        if self.cfg.train_text_encoder:
            state |= {TEXT_ENCODER_PREFIX + k: v for k, v in self.parts.text_encoder.state_dict().items()}
        return state

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        self.parts.unet.load_state_dict(_unprefixed(state, UNET_PREFIX))
        if self.cfg.train_text_encoder:
            self.parts.text_encoder.load_state_dict(_unprefixed(state, TEXT_ENCODER_PREFIX))

    def save(self, out_dir: Path, base_model_dir: Path) -> None:
        # The base model's own sampler class, on the training noise schedule (which carries prediction_type).
        _library, class_name = json.loads((base_model_dir / MODEL_INDEX_FILE).read_text())["scheduler"]
        scheduler = getattr(diffusers, class_name).from_config(self.parts.noise_scheduler.config)
        save_pipeline(assemble_pipeline(self.parts, scheduler), out_dir)


class Lora(_Method):
    """peft LoRA adapters on the UNet attention (and the text encoder with ``train_text_encoder``)."""

    name = "lora"

    def __init__(self, cfg: TrainConfig, parts: PipelineComponents) -> None:
        super().__init__(cfg, parts)
        settings = cfg.lora
        parts.unet.requires_grad_(False)
        parts.text_encoder.requires_grad_(False)
        adapted = {"unet": (parts.unet, settings.unet_target_modules)}
        if cfg.train_text_encoder:
            adapted["text_encoder"] = (parts.text_encoder, settings.text_encoder_target_modules)
        for module, targets in adapted.values():
            module.add_adapter(
                peft.LoraConfig(
                    r=settings.rank,
                    lora_alpha=settings.alpha,
                    lora_dropout=settings.dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(targets),
                )
            )
        self._adapted = {name: module for name, (module, _targets) in adapted.items()}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return dict(self._adapted)

    def cast_frozen_weights(self, dtype: torch.dtype) -> None:
        super().cast_frozen_weights(dtype)
        for module in self._adapted.values():
            module.to(dtype=dtype)  # the frozen base layers...
            cast_training_params(module, dtype=torch.float32)  # ...but the LoRA weights stay fp32 master weights

    def parameter_groups(self) -> list[dict]:
        groups = []
        for name, module in self._adapted.items():
            learning_rate = self.cfg.optim.learning_rate if name == "unet" else self._text_encoder_learning_rate()
            groups.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": learning_rate})
        return groups

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value
            for name, module in self._adapted.items()
            for key, value in get_peft_model_state_dict(module).items()
        }

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, module in self._adapted.items():
            result = set_peft_model_state_dict(module, _unprefixed(state, f"{name}."))
            if result.unexpected_keys:
                raise ValueError(f"LoRA checkpoint for {name}: unexpected keys {result.unexpected_keys[:5]}")

    def save(self, out_dir: Path, base_model_dir: Path) -> None:
        save_lora(out_dir, self.parts.unet, self._adapted.get("text_encoder"))


class TextualInversion(_Method):
    """New placeholder tokens, one per label (``num_vectors`` rows each), initialised from a word; only
    those embedding rows learn: every other row is restored after each optimizer step."""

    name = "textual_inversion"

    def __init__(
        self,
        cfg: TrainConfig,
        parts: PipelineComponents,
        placeholder_tokens: dict[str, str],
    ) -> None:
        super().__init__(cfg, parts)
        settings = cfg.textual_inversion
        self.placeholder_tokens = dict(placeholder_tokens)  # label -> token
        self.token_ids = add_placeholder_tokens(parts, placeholder_tokens.values(), settings.num_vectors)
        initializer_ids = parts.tokenizer(settings.initializer_word, add_special_tokens=False).input_ids
        parts.unet.requires_grad_(False)
        parts.text_encoder.requires_grad_(False)
        embeddings = parts.text_encoder.get_input_embeddings().weight  # (vocab, hidden)
        with torch.no_grad():
            start = embeddings[initializer_ids].mean(dim=0)  # (hidden,)
            for ids in self.token_ids.values():
                embeddings[ids] = start
        embeddings.requires_grad_(True)
        self.embeddings = embeddings
        self.original_embeddings = embeddings.detach().clone()
        learned = torch.zeros(len(embeddings), dtype=torch.bool)
        for ids in self.token_ids.values():
            learned[ids] = True
        self.frozen_rows = ~learned  # (vocab,)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.parts.text_encoder}

    def parameter_groups(self) -> list[dict]:
        return [{"params": [self.embeddings], "lr": self.cfg.optim.learning_rate}]

    def after_optimizer_step(self) -> None:
        # AdamW's weight decay and momentum touch every row; only the placeholders may change.
        with torch.no_grad():
            frozen = self.frozen_rows.to(self.embeddings.device)
            self.embeddings[frozen] = self.original_embeddings.to(self.embeddings.device)[frozen]

    def learned_vectors(self) -> dict[str, torch.Tensor]:
        """token -> (num_vectors, hidden) current embedding rows."""
        return {token: self.embeddings[ids].detach() for token, ids in self.token_ids.items()}

    def trained_state(self) -> dict[str, torch.Tensor]:
        return self.learned_vectors()

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for token, ids in self.token_ids.items():
                self.embeddings[ids] = state[token].to(self.embeddings.device, self.embeddings.dtype)

    def save(self, out_dir: Path, base_model_dir: Path) -> None:
        vectors = self.learned_vectors()
        save_textual_inversion(
            out_dir, {label: (token, vectors[token]) for label, token in self.placeholder_tokens.items()}
        )

    def set_train_mode(self, is_training: bool) -> None:
        self.parts.unet.eval()
        self.parts.text_encoder.train(is_training)


def add_placeholder_tokens(parts: PipelineComponents, tokens, num_vectors: int) -> dict[str, list[int]]:
    """Add each token (as ``num_vectors`` tokens) to the tokenizer and grow the text encoder's embedding.

    Returns token -> its ids. ValueError if a token is already in the vocabulary.
    """
    token_ids = {}
    for token in tokens:
        vectors = placeholder_vectors(token, num_vectors)
        # Checked first: add_tokens reports an existing vocabulary entry as added, then maps it to the old id.
        if any(vector in parts.tokenizer.get_vocab() for vector in vectors):
            raise ValueError(f"textual inversion: token {token!r} is already in the tokenizer's vocabulary")
        parts.tokenizer.add_tokens(vectors)
        token_ids[token] = parts.tokenizer.convert_tokens_to_ids(vectors)
    parts.text_encoder.resize_token_embeddings(len(parts.tokenizer))
    return token_ids


def build_method(cfg: TrainConfig, parts: PipelineComponents, placeholder_tokens: dict[str, str]) -> _Method:
    """The method object of ``cfg.method``, with ``parts`` set up for it (requires_grad, adapters, tokens)."""
    if cfg.method == "dreambooth":
        return DreamBooth(cfg, parts)
    if cfg.method == "lora":
        return Lora(cfg, parts)
    return TextualInversion(cfg, parts, placeholder_tokens)


def _unprefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
