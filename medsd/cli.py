"""The `medsd` command: argument wiring only; every command calls one medsd function."""

from __future__ import annotations

import json
import logging
import sys

import click

from medsd.config import DemoConfig, ModelConfig, PhantomConfig, load_config

CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML config file"
)
SET_OPTION = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="override a config field (repeatable)"
)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """medsd: fine-tune, bulk-generate, serve and evaluate synthetic chest radiographs on Ray."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@main.group()
def data() -> None:
    """Inspect CheXpert-style datasets."""


@data.command("inspect")
@click.argument("csv", type=click.Path(dir_okay=False))
@click.option("--root", type=click.Path(file_okay=False), default=None, help="folder the CSV's Paths are under")
@click.option("--no-images", is_flag=True, help="skip checking that images exist and decode")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def data_inspect(csv: str, root: str | None, no_images: bool, as_json: bool) -> None:
    """Validate CSV and its images and summarise the labels; exit 1 when errors are found."""
    from medsd.data import inspect_dataset

    inspection = _run_or_exit(lambda: inspect_dataset(csv, root, check_images=not no_images))
    click.echo(json.dumps(inspection.to_dict(), indent=2) if as_json else inspection.to_text())
    sys.exit(1 if inspection.has_errors else 0)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", "n_images", type=int, default=None, help="number of images (train + valid)")
@click.option("--size", "image_size_px", type=int, default=None, help="image side in pixels")
@click.option("--seed", type=int, default=None, help="random seed")
@CONFIG_OPTION
@SET_OPTION
def phantom(out: str, n_images, image_size_px, seed, config_path, overrides) -> None:
    """Write the phantom CheXpert-style dataset to OUT."""
    from medsd.phantom import write_phantom

    flags = {"n_images": n_images, "image_size_px": image_size_px, "seed": seed}
    cfg = _load(PhantomConfig, config_path, [*overrides, *_flag_overrides(flags)])
    summary = _run_or_exit(lambda: write_phantom(out, cfg))
    click.echo(
        f"phantom: {summary.n_train} train + {summary.n_valid} valid images "
        f"({summary.n_lateral} lateral) in {summary.seconds:.1f} s -> {summary.out}"
    )


@main.group()
def model() -> None:
    """Build and describe models."""


@model.command("build")
@CONFIG_OPTION
@SET_OPTION
def model_build(config_path, overrides) -> None:
    """Resolve (and for 'tiny', build and cache) the model; print its folder and content hash."""
    from medsd.models import model_hash, resolve_model_dir

    cfg = _load(ModelConfig, config_path, list(overrides))
    model_dir = _run_or_exit(lambda: resolve_model_dir(cfg.model, cfg.cache_dir))
    click.echo(f"model {cfg.model}: {model_dir} (hash {model_hash(model_dir)})")


@main.command()
@click.option("--out", default=None, help="output folder (default medsd-demo)")
@click.option("--quick", is_flag=True, help="every stage at a smoke size: a few minutes on 2 cores (CI runs it)")
@click.option("--serve", is_flag=True, help="afterwards, serve the fine-tuned model (HTTP API and web page)")
@CONFIG_OPTION
@SET_OPTION
def demo(out, quick, serve, config_path, overrides) -> None:
    """Run medsd end to end on the embedded defaults: phantom data, fine-tuning, a synthetic dataset, its
    evaluation (the AUC table real vs synthetic vs mixed) and a sample grid. Rerunning reuses what is done."""
    from medsd.demo import QUICK_OVERRIDES, run_demo

    quick_overrides = list(QUICK_OVERRIDES) if quick else []
    cfg = _load(DemoConfig, config_path, [*quick_overrides, *overrides, *_flag_overrides({"out": out})])
    result = _run_or_exit(lambda: run_demo(cfg))
    click.echo(result.summary())
    if serve:
        from medsd.config import ServeConfig
        from medsd.service.server import run_server

        serve_cfg = ServeConfig(model=cfg.model.model_copy(update={"model": str(result.model_dir)}))
        click.echo(f"serving the fine-tuned model at http://{serve_cfg.host}:{serve_cfg.port}/ (Ctrl-C stops it)")
        _run_or_exit(lambda: run_server(serve_cfg, blocking=True))


@main.command()
@click.option("--model", "model_name", default=None, help="'tiny', a diffusers folder or a cached hub id")
@click.option("--out", default=None, help="output folder or pyarrow filesystem URI")
@click.option("--per-label", "per_label", type=int, default=None, help="images per label (and per prompt)")
@click.option("--labels", default=None, help="comma-separated observations, e.g. 'Cardiomegaly,Pleural Effusion'")
@click.option("--steps", type=int, default=None, help="denoising steps per image")
@click.option("--guidance", "guidance_scales", type=float, multiple=True, help="guidance scale; repeat for a sweep")
@click.option("--seed", type=int, default=None, help="seed of the plan (every image's seed derives from it)")
@CONFIG_OPTION
@SET_OPTION
def generate(model_name, out, per_label, labels, steps, guidance_scales, seed, config_path, overrides) -> None:
    """Bulk-generate a CheXpert-style synthetic dataset (PNGs, parquet, train.csv, manifest) on Ray Data.

    Rerunning the same command after a crash finishes the dataset instead of starting over.
    """
    from medsd.config import GenerateConfig
    from medsd.generate import run_generate

    flags = {
        "model.model": model_name,
        "out": out,
        "per_label": per_label,
        "labels": [label.strip() for label in labels.split(",") if label.strip()] if labels is not None else None,
        "steps": steps,
        "guidance_scales": list(guidance_scales) or None,
        "seed": seed,
    }
    cfg = _load(GenerateConfig, config_path, [*overrides, *_flag_overrides(flags)])
    result = _run_or_exit(lambda: run_generate(cfg))
    click.echo(result.summary_line())


@main.command()
@click.option("--model", "model_name", default=None, help="'tiny', a diffusers folder or a cached hub id")
@click.option("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
@click.option("--port", type=int, default=None, help="HTTP port (default 8000)")
@CONFIG_OPTION
@SET_OPTION
def serve(model_name, host, port, config_path, overrides) -> None:
    """Serve the HTTP API and web page on a local Ray (or RAY_ADDRESS) until interrupted.

    When the environment variable named by the api_key_env setting holds a key, every route but /healthz needs it.
    """
    from medsd.config import ServeConfig
    from medsd.service.server import run_server

    flags = {"model.model": model_name, "host": host, "port": port}
    cfg = _load(ServeConfig, config_path, [*overrides, *_flag_overrides(flags)])
    _run_or_exit(lambda: run_server(cfg, blocking=True))


@main.command()
@click.option("--out", default=None, help="output folder (default medsd-train)")
@CONFIG_OPTION
@SET_OPTION
def train(out, config_path, overrides) -> None:
    """Fine-tune a Stable Diffusion model with Ray Train (DreamBooth, LoRA or textual inversion).

    Rerunning the same command resumes from the latest checkpoint.
    """
    from medsd.config import TrainConfig
    from medsd.train import run_training

    cfg = _load(TrainConfig, config_path, [*overrides, *_flag_overrides({"out": out})])
    result = _run_or_exit(lambda: run_training(cfg))
    click.echo(result.summary())


@main.command()
@click.option("--real", "real_csv", type=click.Path(dir_okay=False), default=None, help="real training CSV")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="folder the real CSV's Paths are under")
@click.option(
    "--synthetic", multiple=True, type=click.Path(), help="synthetic dataset folder; repeat to compare several"
)
@click.option("--test", "test_csv", type=click.Path(dir_okay=False), default=None, help="held-out real test CSV")
@click.option("--out", default=None, help="output folder (default medsd-evaluate)")
@CONFIG_OPTION
@SET_OPTION
def evaluate(real_csv, root, synthetic, test_csv, out, config_path, overrides) -> None:
    """Does the synthetic data help? Train classifiers on real, synthetic and both (parallel Ray tasks), test
    them on held-out real images, and measure fidelity, diversity and memorization; writes report.md."""
    from medsd.config import EvaluateConfig
    from medsd.evaluate import run_evaluation

    flags = {
        "real.csv": real_csv,
        "real.root": root,
        "synthetic": list(synthetic) or None,
        "test_csv": test_csv,
        "out": out,
    }
    cfg = _load(EvaluateConfig, config_path, [*overrides, *_flag_overrides(flags)])
    result = _run_or_exit(lambda: run_evaluation(cfg))
    click.echo(result.summary())


@main.command()
@click.option("--synthetic", type=click.Path(), default=None, help="synthetic dataset folder to curate")
@click.option("--real", "real_csv", type=click.Path(dir_okay=False), default=None, help="real CSV the judge trains on")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="folder the real CSV's Paths are under")
@click.option("--out", default=None, help="curated dataset folder, new or empty (default medsd-curated)")
@CONFIG_OPTION
@SET_OPTION
def curate(synthetic, real_csv, root, out, config_path, overrides) -> None:
    """Keep the synthetic images whose labels a classifier trained on the real images agrees with, as a new
    dataset folder; curation.csv lists every image's verdict and reason."""
    from medsd.config import CurateConfig
    from medsd.curate import run_curation

    flags = {"synthetic": synthetic, "real.csv": real_csv, "real.root": root, "out": out}
    cfg = _load(CurateConfig, config_path, [*overrides, *_flag_overrides(flags)])
    result = _run_or_exit(lambda: run_curation(cfg))
    click.echo(result.summary())


def _flag_overrides(flags: dict) -> list[str]:
    """Flags the user gave, as key=value overrides applied after --set (flags win)."""
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]


def _load(config_class, config_path, overrides):
    return _run_or_exit(lambda: load_config(config_class, config_path, overrides))


def _run_or_exit(action):
    """Turn a user error into a one-line message and exit code 2 instead of a traceback."""
    try:
        return action()
    except (ValueError, OSError) as error:  # bad input, missing or clashing files
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
