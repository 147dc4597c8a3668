"""medsd.train.methods: what each method trains, what its checkpoint holds and what it saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsd.adapters import LEARNED_EMBEDS_FILE, LORA_WEIGHTS_FILE, PLACEHOLDER_TOKENS_FILE
from medsd.models import load_components
from medsd.train.methods import DreamBooth, Lora, TextualInversion, add_placeholder_tokens, build_method

TOKENS = {"Cardiomegaly": "<cardiomegaly>", "Edema": "<edema>"}


def _trained_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _step(method) -> None:
    """One optimizer step on a loss touching every trained parameter."""
    optimizer = torch.optim.AdamW(method.parameter_groups(), weight_decay=0.5)
    sum(p.float().pow(2).sum() for p in method.trainable_parameters()).backward()
    optimizer.step()
    method.after_optimizer_step()


def test_build_method_picks_the_strategy_once(make_config, tiny_model_dir) -> None:
    for name, kind in (("dreambooth", DreamBooth), ("lora", Lora), ("textual_inversion", TextualInversion)):
        method = build_method(make_config(f"method={name}"), load_components(tiny_model_dir), TOKENS)
        assert type(method) is kind and method.name == name


def test_dreambooth_trains_the_unet_and_optionally_the_text_encoder(make_config, tiny_model_dir, tmp_path) -> None:
    parts = load_components(tiny_model_dir)
    method = DreamBooth(make_config("method=dreambooth"), parts)
    assert _trained_names(parts.unet) == {n for n, _ in parts.unet.named_parameters()}
    assert not _trained_names(parts.text_encoder) and not _trained_names(parts.vae)
    assert list(method.trainable_modules()) == ["unet"]
    with_text = DreamBooth(
        make_config("method=dreambooth", "train_text_encoder=true", "optim.text_encoder_learning_rate=1e-5"),
        load_components(tiny_model_dir),
    )
    assert [g["lr"] for g in with_text.parameter_groups()] == [1e-4, 1e-5]
    assert any(k.startswith("text_encoder.") for k in with_text.trained_state())

    state = {k: v.clone() for k, v in method.trained_state().items()}
    _step(method)
    changed = {k for k, v in method.trained_state().items() if not torch.equal(v, state[k])}
    assert changed and all(k.startswith("unet.") for k in changed)
    method.load_trained_state(state)
    assert all(torch.equal(v, state[k]) for k, v in method.trained_state().items())


def test_lora_trains_only_adapter_weights(make_config, tiny_model_dir, tmp_path) -> None:
    parts = load_components(tiny_model_dir)
    method = Lora(make_config("method=lora", "lora.rank=2", "lora.unet_target_modules=[to_q, to_v]"), parts)
    trained = _trained_names(parts.unet)
    assert trained and all("lora_" in name for name in trained)
    assert all((".to_q." in name or ".to_v." in name) and ".to_k." not in name for name in trained)
    assert not _trained_names(parts.text_encoder)
    state = {k: v.clone() for k, v in method.trained_state().items()}
    _step(method)
    method.load_trained_state(state)
    assert all(torch.equal(v, state[k]) for k, v in method.trained_state().items())
    method.save(tmp_path, tiny_model_dir)
    assert [p.name for p in tmp_path.iterdir()] == [LORA_WEIGHTS_FILE]


def test_lora_keeps_master_weights_fp32_when_frozen_weights_are_cast(make_config, tiny_model_dir) -> None:
    parts = load_components(tiny_model_dir)
    method = Lora(make_config("method=lora", "train_text_encoder=true"), parts)
    method.cast_frozen_weights(torch.bfloat16)
    assert {p.dtype for p in method.trainable_parameters()} == {torch.float32}
    frozen = [p for p in parts.unet.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert parts.vae.dtype == torch.float32  # SD's VAE overflows in half precision


def test_textual_inversion_learns_only_placeholder_rows(make_config, tiny_model_dir, tmp_path) -> None:
    parts = load_components(tiny_model_dir)
    vocab_before = len(parts.tokenizer)
    method = TextualInversion(
        make_config(
            "method=textual_inversion", "textual_inversion.num_vectors=2", "textual_inversion.initializer_word=heart"
        ),
        parts,
        TOKENS,
    )
    assert len(parts.tokenizer) == vocab_before + 4
    embeddings = parts.text_encoder.get_input_embeddings().weight
    before = embeddings.detach().clone()
    heart = parts.tokenizer("heart", add_special_tokens=False).input_ids
    torch.testing.assert_close(before[method.token_ids["<edema>"][1]], before[heart].mean(0))
    _step(method)  # weight decay and momentum would move every row
    after = embeddings.detach()
    learned = [i for ids in method.token_ids.values() for i in ids]
    assert not torch.equal(after[learned], before[learned])
    others = torch.ones(len(after), dtype=torch.bool)
    others[learned] = False
    assert torch.equal(after[others], before[others])
    assert {k: v.shape for k, v in method.trained_state().items()} == {
        "<cardiomegaly>": (2, embeddings.shape[1]),
        "<edema>": (2, embeddings.shape[1]),
    }
    method.save(tmp_path, tiny_model_dir)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [f"cardiomegaly/{LEARNED_EMBEDS_FILE}", f"edema/{LEARNED_EMBEDS_FILE}", PLACEHOLDER_TOKENS_FILE]
    )


def test_a_placeholder_already_in_the_vocabulary_is_an_error(tiny_model_dir) -> None:
    parts = load_components(tiny_model_dir)
    with pytest.raises(ValueError, match="token 'chest</w>' is already in the tokenizer's vocabulary"):
        add_placeholder_tokens(parts, ["chest</w>"], 1)


def test_dreambooth_save_is_a_diffusers_folder_with_the_base_sampler(
    make_config, tiny_model_dir, tmp_path: Path
) -> None:
    parts = load_components(tiny_model_dir)
    method = DreamBooth(make_config("method=dreambooth"), parts)
    method.save(tmp_path, tiny_model_dir)
    index = (tmp_path / "model_index.json").read_text()
    assert '"DDIMScheduler"' in index and '"safety_checker"' in index
    assert list((tmp_path / "unet").glob("*.safetensors"))
