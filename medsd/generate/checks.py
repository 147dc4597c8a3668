"""Checks of a generate run before any actor starts: sampler, device, model, adapters, output folder, cluster."""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
import torch

from medsd.config import GenerateConfig
from medsd.generate.storage import OutputFolder
from medsd.models import check_sampler, model_hash, resolve_model_dir, select_dtype


@dataclass(frozen=True)
class CheckedInputs:
    """What checking a GenerateConfig found: the model folder and hashes, and the output folder."""

    folder: OutputFolder
    model_dir: str
    model_hash: str
    adapter_hashes: dict[str, str] = field(default_factory=dict)
    placeholder_tokens: dict[str, str] = field(default_factory=dict)


def check_inputs(cfg: GenerateConfig) -> CheckedInputs:
    """Sampler, device and precision, model, adapters and output folder, checked on the driver.

    Collects every problem, then raises once: FileNotFoundError or PermissionError when every problem is of
    that kind, ValueError otherwise; each message names the config field at fault.
    """
    problems: list[Exception] = []
    try:
        check_sampler(cfg.sampler)
    except ValueError as error:
        problems.append(ValueError(f"generate.sampler: {error}"))
    if cfg.num_gpus_per_actor == 0:  # actors without GPUs run on the CPU whatever the driver has
        if cfg.model.device == "cuda":
            problems.append(ValueError("generate.model.device='cuda' but num_gpus_per_actor=0; give actors a GPU"))
        try:
            select_dtype(torch.device("cpu"), cfg.model.precision)
        except ValueError as error:
            problems.append(ValueError(f"generate.{error}"))
    elif cfg.model.device == "cpu":
        problems.append(ValueError(f"generate.num_gpus_per_actor={cfg.num_gpus_per_actor:g} but model.device='cpu'"))
    model_dir = None
    try:
        model_dir = resolve_model_dir(cfg.model.model, cfg.model.cache_dir)
    except (ValueError, FileNotFoundError) as error:
        problems.append(type(error)(f"generate.model.model: {error}"))
    adapter_hashes, tokens = _check_adapters(cfg, problems)
    try:
        folder = OutputFolder(cfg.out)
        folder.check_writable()
    except (ValueError, PermissionError) as error:
        problems.append(error)
    if problems:
        kinds = {type(problem) for problem in problems}
        kind = kinds.pop() if len(kinds) == 1 else ValueError
        raise kind("; ".join(str(problem) for problem in problems))
    return CheckedInputs(folder, model_dir, model_hash(model_dir), adapter_hashes, tokens)


def check_cluster_fits(cfg: GenerateConfig) -> None:
    """ValueError when no node could ever host one actor (Ray Data would wait for it forever)."""
    resources = ray.cluster_resources()
    needs = {"CPU": cfg.cpus_per_actor, "GPU": cfg.num_gpus_per_actor}
    field_of = {"CPU": "cpus_per_actor", "GPU": "num_gpus_per_actor"}
    short = [
        f"generate.{field_of[name]}={amount:g} but the Ray cluster has {resources.get(name, 0):g} {name}s"
        for name, amount in needs.items()
        if amount > resources.get(name, 0)
    ]
    if short:
        raise ValueError("; ".join(short) + "; lower it or add nodes")


def _check_adapters(cfg: GenerateConfig, problems: list[Exception]) -> tuple[dict[str, str], dict[str, str]]:
    """adapter name -> content hash for every adapter a label uses, and label -> textual-inversion token;
    problems are appended to ``problems``."""
    if not cfg.label_adapters:
        return {}, {}
    from medsd.adapters import AdapterKind, adapter_hash, adapter_kind, placeholder_tokens

    paths = {adapter.name: adapter.path for adapter in cfg.model.adapters}
    hashes, tokens = {}, {}
    for label, name in cfg.label_adapters.items():
        try:
            kind = adapter_kind(paths[name])
            hashes[name] = adapter_hash(paths[name])
            if kind is AdapterKind.TEXTUAL_INVERSION:
                tokens[label] = placeholder_tokens(paths[name])[label]
        except (ValueError, FileNotFoundError) as error:
            problems.append(type(error)(f"generate.label_adapters.{label} ({name}): {error}"))
        except KeyError:
            problems.append(ValueError(f"generate.label_adapters.{label} ({name}): no textual-inversion token for it"))
    return hashes, tokens
