"""medsd.adapters: LoRA and textual-inversion files round-trip through plain diffusers and medsd's loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig

from medsd.adapters import (
    LEARNED_EMBEDS_FILE,
    LORA_WEIGHTS_FILE,
    PLACEHOLDER_TOKENS_FILE,
    AdapterKind,
    activate_adapter,
    adapter_kind,
    load_adapters,
    loaded_adapters,
    placeholder_tokens,
    read_learned_embeds,
    save_lora,
    save_textual_inversion,
)
from medsd.config import AdapterConfig, ModelConfig
from medsd.models import load_components, load_pipeline
from medsd.sampling import sample_images

PROMPT = "a frontal chest x-ray showing cardiomegaly"
SAMPLE = {"steps": 2, "guidance_scale": 1.0}


def _lora_dir(model_dir: Path, out: Path, seed: int, with_text_encoder: bool = False) -> Path:
    """A LoRA with large random B matrices, so it visibly changes the output."""
    torch.manual_seed(seed)
    parts = load_components(model_dir)
    parts.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if with_text_encoder:
        parts.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    for module in (parts.unet, parts.text_encoder):
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.5)
    save_lora(out, parts.unet, parts.text_encoder if with_text_encoder else None)
    return out


def _textual_inversion_dir(model_dir: Path, out: Path) -> Path:
    hidden = load_components(model_dir).text_encoder.config.hidden_size
    save_textual_inversion(
        out,
        {
            "Cardiomegaly": ("<cardiomegaly>", torch.randn(2, hidden)),
            "Pleural Effusion": ("<pleural-effusion>", torch.randn(1, hidden)),
        },
    )
    return out


def _sample(pipe, prompt: str = PROMPT) -> np.ndarray:
    return sample_images(pipe, [prompt], [0], **SAMPLE)[0]


def test_lora_file_loads_in_plain_diffusers_and_changes_the_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = _lora_dir(tiny_model_dir, tmp_path / "lora", seed=1, with_text_encoder=True)
    assert (out / LORA_WEIGHTS_FILE).is_file()
    assert adapter_kind(out) is AdapterKind.LORA
    pipe = load_pipeline(ModelConfig(model=str(tiny_model_dir)))
    base = _sample(pipe)
    pipe.load_lora_weights(str(out))  # plain diffusers
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
    assert not np.array_equal(_sample(pipe), base)


def test_load_and_activate_switch_between_loras(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = _lora_dir(tiny_model_dir, tmp_path / "first", seed=1)
    second = _lora_dir(tiny_model_dir, tmp_path / "second", seed=2)
    pipe = load_pipeline(ModelConfig(model=str(tiny_model_dir)))
    base = _sample(pipe)
    load_adapters(pipe, [AdapterConfig(name="first", path=str(first)), AdapterConfig(name="second", path=str(second))])
    assert loaded_adapters(pipe) == {"first": AdapterKind.LORA, "second": AdapterKind.LORA}
    np.testing.assert_array_equal(_sample(pipe), base)  # several LoRAs loaded: none active until chosen

    activate_adapter(pipe, "first")
    with_first = _sample(pipe)
    activate_adapter(pipe, "second")
    with_second = _sample(pipe)
    activate_adapter(pipe, None)
    np.testing.assert_array_equal(_sample(pipe), base)
    activate_adapter(pipe, "first")
    np.testing.assert_array_equal(_sample(pipe), with_first)
    assert not np.array_equal(with_first, base)
    assert not np.array_equal(with_first, with_second)


def test_textual_inversion_layout_and_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = _textual_inversion_dir(tiny_model_dir, tmp_path / "ti")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [f"cardiomegaly/{LEARNED_EMBEDS_FILE}", f"pleural-effusion/{LEARNED_EMBEDS_FILE}", PLACEHOLDER_TOKENS_FILE]
    )
    assert placeholder_tokens(out) == {"Cardiomegaly": "<cardiomegaly>", "Pleural Effusion": "<pleural-effusion>"}
    assert read_learned_embeds(out / "cardiomegaly" / LEARNED_EMBEDS_FILE)["<cardiomegaly>"].shape[0] == 2

    plain = load_pipeline(ModelConfig(model=str(tiny_model_dir)))
    plain.load_textual_inversion(str(out / "cardiomegaly"))  # plain diffusers, one token per file
    assert "<cardiomegaly>_1" in plain.tokenizer.get_vocab()  # num_vectors=2 -> two tokens

    pipe = load_pipeline(ModelConfig(model=str(tiny_model_dir)))
    base = _sample(pipe, "a frontal chest x-ray showing <cardiomegaly>")
    load_adapters(pipe, [AdapterConfig(name="ti", path=str(out))])
    assert loaded_adapters(pipe) == {"ti": AdapterKind.TEXTUAL_INVERSION}
    vocab = pipe.tokenizer.get_vocab()
    assert {"<cardiomegaly>", "<cardiomegaly>_1", "<pleural-effusion>"} <= set(vocab)
    activate_adapter(pipe, "ti")  # no LoRA loaded: nothing to switch, and no error
    assert not np.array_equal(_sample(pipe, "a frontal chest x-ray showing <cardiomegaly>"), base)


def test_load_pipeline_loads_configured_adapters(tiny_model_dir: Path, tmp_path: Path) -> None:
    lora = _lora_dir(tiny_model_dir, tmp_path / "lora", seed=3)
    cfg = ModelConfig(model=str(tiny_model_dir), adapters=[AdapterConfig(name="effusion", path=str(lora))])
    pipe = load_pipeline(cfg)
    assert loaded_adapters(pipe) == {"effusion": AdapterKind.LORA}


def test_bad_adapters_fail_before_loading_naming_the_entry(tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    pipe = load_pipeline(ModelConfig(model=str(tiny_model_dir)))
    with pytest.raises(ValueError, match=r"model\.adapters\[0\] \(nothing\).*neither"):
        load_adapters(pipe, [AdapterConfig(name="nothing", path=str(empty))])
    with pytest.raises(ValueError, match=r"model\.adapters\[0\] \(gone\).*does not exist"):
        load_adapters(pipe, [AdapterConfig(name="gone", path=str(tmp_path / "missing"))])
    lora = _lora_dir(tiny_model_dir, tmp_path / "lora", seed=4)
    with pytest.raises(ValueError, match=r"duplicate names \['x'\]"):
        load_adapters(pipe, [AdapterConfig(name="x", path=str(lora)), AdapterConfig(name="x", path=str(lora))])
    assert loaded_adapters(pipe) == {}
    with pytest.raises(ValueError, match="adapter 'absent' is not loaded; loaded adapters: none"):
        activate_adapter(pipe, "absent")


def test_placeholder_tokens_file_is_json_of_label_to_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = _textual_inversion_dir(tiny_model_dir, tmp_path / "ti")
    assert json.loads((out / PLACEHOLDER_TOKENS_FILE).read_text())["Pleural Effusion"] == "<pleural-effusion>"
    with pytest.raises(FileNotFoundError, match=PLACEHOLDER_TOKENS_FILE):
        placeholder_tokens(tmp_path)
