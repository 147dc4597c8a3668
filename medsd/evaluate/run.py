"""`medsd evaluate` end to end: decode every set, train and score the arms as parallel Ray tasks, measure the
synthetic sets, then write results.csv, report.md, the figures and the resolved config."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml

from medsd.config import EvaluateConfig
from medsd.evaluate.arms import REAL, VARIANT_PREFIX, ArmResult, plan_arms, train_and_score, training_sets
from medsd.evaluate.inputs import EvaluationInputs, load_inputs
from medsd.evaluate.plots import (
    plot_auc_bars,
    plot_auc_vs_guidance,
    save_comparison_grid,
    save_memorization_pairs,
    save_samples_grid,
)
from medsd.evaluate.quality import QualityReport, measure_quality
from medsd.evaluate.report import cell, flags, results_frame, write_report
from medsd.ray_session import ensure_ray

logger = logging.getLogger(__name__)

RESULTS_CSV, REPORT_MD, CONFIG_YAML = "results.csv", "report.md", "config.yaml"


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation measured and wrote: arms in plan order, set quality, flags and output files."""

    out: Path
    labels: list[str]
    arms: list[ArmResult]
    quality: QualityReport
    flags: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def arm(self, name: str) -> ArmResult:
        return next(arm for arm in self.arms if arm.plan.name == name)

    def summary(self) -> str:
        """What `medsd evaluate` and jobs/evaluate.py print: where the report is, the AUC table, any warning."""
        lines = [f"medsd evaluate finished in {self.seconds:.0f} s -> {self.files['report']}", self.auc_table_text()]
        return "\n".join(lines + [f"WARNING memorization: {warning}" for warning in self.flags])

    def auc_table_text(self) -> str:
        """Plain-text AUC table (arm x label and mean), NaN shown as n/a: what the CLI prints."""
        width = max(len(arm.plan.title) for arm in self.arms)
        columns = [*self.labels, "Mean"]
        header = f"{'AUC':<{width}}" + "".join(f"  {name:>{max(len(name), 5)}}" for name in columns)
        rows = [
            f"{arm.plan.title:<{width}}"
            + "".join(
                f"  {cell(value):>{max(len(name), 5)}}"
                for name, value in zip(columns, [*map(arm.scores.aucs.get, self.labels), arm.scores.mean], strict=True)
            )
            for arm in self.arms
        ]
        return "\n".join([header, *rows])


def run_evaluation(cfg: EvaluateConfig) -> EvaluationResult:
    """Evaluate ``cfg.synthetic`` against ``cfg.real``; see EvaluateConfig. Bad input raises before training."""
    started = time.perf_counter()
    out = Path(cfg.out)

    # 1. Decode and check every set on Ray; put each once in the object store for the tasks.
    ensure_ray()
    inputs = load_inputs(cfg)
    sets = training_sets(cfg, inputs)
    plans = plan_arms(cfg, sets, None if inputs.primary is None else inputs.variants[inputs.primary].name)
    set_refs = {name: ray.put(images) for name, images in sets.items()}
    test_ref = ray.put(inputs.test)
    config = cfg.model_dump(mode="json")

    # 2. The arms, in parallel: one task each (one GPU each on a cluster).
    logger.info(
        "training %d classifiers as Ray tasks: %s",
        len(plans),
        ", ".join(f"{p.name} ({' then '.join(f'{s.set_name} {s.images}' for s in p.stages)} images)" for p in plans),
    )
    arm_task = ray.remote(num_cpus=cfg.cpus_per_arm, num_gpus=cfg.gpus_per_arm)(train_and_score)
    arm_refs = [
        arm_task.remote(plan, config, test_ref, *[set_refs[stage.set_name] for stage in plan.stages]) for plan in plans
    ]

    # 3. Fidelity, diversity, memorization: starts once the real arm's classifier (the feature extractor) exists.
    real_ref = next((ref for plan, ref in zip(plans, arm_refs, strict=True) if plan.keeps_model), None)
    quality_task = ray.remote(num_cpus=cfg.cpus_per_arm, num_gpus=cfg.gpus_per_arm)(measure_quality)
    quality_ref = quality_task.remote(config, real_ref, set_refs[REAL], test_ref, *map(ray.put, inputs.variants))
    arms = ray.get(arm_refs)
    quality = ray.get(quality_ref)

    # 4. Outputs.
    files = write_outputs(cfg, inputs, arms, quality, out)
    result = EvaluationResult(
        out, list(cfg.labels), arms, quality, flags(cfg, quality), files, time.perf_counter() - started
    )
    for warning in result.flags:
        logger.warning("memorization: %s", warning)
    logger.info("evaluation written to %s in %.0f s", out, result.seconds)
    return result


def write_outputs(
    cfg: EvaluateConfig, inputs: EvaluationInputs, arms: list[ArmResult], quality: QualityReport, out: Path
) -> dict[str, Path]:
    """results.csv, the figures, report.md and config.yaml under ``out``; returns them by name."""
    out.mkdir(parents=True, exist_ok=True)
    results_frame(cfg, arms, quality).to_csv(out / RESULTS_CSV, index=False)
    sweep = [arm for arm in arms if arm.plan.variant is not None]
    main_arms = [arm for arm in arms if not arm.plan.name.startswith(VARIANT_PREFIX)]
    figures = {
        "AUC per label": plot_auc_bars(main_arms, inputs.real.labels, out / "auc_per_label.png"),
        "Synthetic samples per label": save_samples_grid(inputs.synthetic, cfg.samples_per_label, out / "samples.png"),
        "Most similar synthetic / training pairs": save_memorization_pairs(
            quality.sets, inputs.variants, inputs.real, cfg.memorization_top_pairs, out / "memorization_pairs.png"
        ),
    }
    if len(inputs.variants) > 1:
        figures["Synthetic sets compared"] = save_comparison_grid(inputs.variants, out / "comparison.png")
    real = next((arm for arm in arms if arm.plan.name == REAL), None)
    guidance_plot = None
    if len(sweep) > 1:  # a sweep: several folders or guidance scales, each with its own synthetic-only arm
        guidance_plot = plot_auc_vs_guidance(sweep, inputs.variants, real, out / "auc_vs_guidance.png")
    if guidance_plot is not None:
        figures["AUC vs guidance scale"] = guidance_plot
    report = write_report(cfg, inputs, arms, quality, figures, out / REPORT_MD)
    config_path = out / CONFIG_YAML
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return {"results": out / RESULTS_CSV, "report": report, "config": config_path, **figures}
