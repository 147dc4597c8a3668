"""`medsd curate` end to end: decode the synthetic folder (and the real images), train the judge as a Ray task
(one GPU on a cluster) or load it, judge every synthetic image, write the curated folder."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from medsd.config import CurateConfig
from medsd.curate.folder import CURATION_CSV, reusable_manifest, write_curated_folder
from medsd.curate.judge import JUDGE_FILE, Judge, judge_probabilities, load_judge, save_judge, train_judge
from medsd.curate.verdicts import Verdicts, judge_verdicts
from medsd.evaluate.images import ImageSet, decode_image_set
from medsd.evaluate.synthetic import TRAIN_CSV, read_manifest_file, read_synthetic_folder
from medsd.generate.plan import file_sha256
from medsd.labels import PATH_COLUMN, VIEWS
from medsd.ray_session import ensure_ray

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurationResult:
    """What a curation kept, from its manifest; ``reused`` when an identical earlier curation was found."""

    out: Path
    manifest: dict
    reused: bool
    seconds: float

    @property
    def kept(self) -> int:
        return self.manifest["curation"]["kept"]

    @property
    def source_images(self) -> int:
        return self.manifest["curation"]["source_images"]

    def summary(self) -> str:
        """What `medsd curate` and jobs/curate.py print: kept share, reasons per label, where it went."""
        curation = self.manifest["curation"]
        per_label = ", ".join(
            f"{label} {counts['missed']} missed / {counts['unwanted']} unwanted"
            for label, counts in curation["rejected_per_label"].items()
        )
        verb = "reused" if self.reused else f"finished in {self.seconds:.0f} s"
        return "\n".join(
            [
                f"medsd curate {verb} -> {self.out}",
                f"kept {self.kept} of {self.source_images} synthetic images ({self.kept / self.source_images:.0%}); "
                f"set aside per label (sign missed / unwanted): {per_label}",
                f"every verdict and its reason: {self.out / CURATION_CSV}",
            ]
        )


def run_curation(cfg: CurateConfig) -> CurationResult:
    """Curate ``cfg.synthetic`` into ``cfg.out``; see CurateConfig. Bad input raises before the judge trains."""
    started = time.perf_counter()
    source, out = Path(cfg.synthetic).expanduser(), Path(cfg.out).expanduser()
    content = curation_content(cfg, source)
    earlier = reusable_manifest(out, content)
    if earlier is not None:
        return CurationResult(out, earlier, reused=True, seconds=time.perf_counter() - started)

    ensure_ray()
    # Every synthetic row is judged whatever the real data's view filter, and none may be skipped unseen.
    every_row = cfg.real.model_copy(update={"views": list(VIEWS), "projections": None, "skip_bad": False})
    synthetic = read_synthetic_folder("synthetic", str(source), every_row, cfg.labels).images
    judge, judge_record = obtain_judge(cfg)
    probabilities = ray.get(
        ray.remote(num_cpus=cfg.cpus, num_gpus=cfg.gpus)(judge_probabilities).remote(judge, synthetic, cfg.device)
    )
    verdicts = judge_verdicts(synthetic.targets, synthetic.mask, probabilities, synthetic.labels, cfg.threshold)
    paths = synthetic.frame[PATH_COLUMN].astype(str).tolist()
    kept_paths = {path for path, kept in zip(paths, verdicts.kept, strict=True) if kept}
    if not kept_paths:
        raise ValueError(
            f"curate: the judge contradicts the labels of every one of the {len(paths)} images of {source} "
            f"(per label: {verdicts.rejected_per_label()}); nothing would be left to train on"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.judge-") as scratch:
        extra = {}
        if cfg.judge.weights_path is None:  # a trained judge is kept beside the data it chose, for reuse
            extra[JUDGE_FILE] = Path(scratch) / JUDGE_FILE
            save_judge(judge, extra[JUDGE_FILE])
        manifest = write_curated_folder(
            source,
            out,
            kept_paths,
            verdicts.frame(paths).to_csv(index=False).encode(),
            extra,
            curation_manifest(cfg, source, content, verdicts, judge_record, time.perf_counter() - started),
        )
    result = CurationResult(out, manifest, reused=False, seconds=time.perf_counter() - started)
    logger.info("curated %s: kept %d of %d images", out, result.kept, result.source_images)
    return result


def obtain_judge(cfg: CurateConfig) -> tuple[Judge, dict]:
    """(the judge, what the manifest says of it): loaded from judge.weights_path, or trained on cfg.real."""
    if cfg.judge.weights_path is not None:
        judge = load_judge(Path(cfg.judge.weights_path).expanduser(), cfg.labels, cfg.real.image_size_px)
        return judge, {"file": cfg.judge.weights_path, "architecture": judge.architecture}
    real: ImageSet = decode_image_set("real", cfg.real, cfg.labels)
    task = ray.remote(num_cpus=cfg.cpus, num_gpus=cfg.gpus)(train_judge)
    logger.info("training the judge on %d real images (%d epochs)", len(real), cfg.judge.epochs)
    judge = ray.get(task.remote(real, cfg.judge, cfg.device))
    return judge, {"file": JUDGE_FILE, "trained_on": cfg.real.csv, "real_images": len(real), **cfg.judge.model_dump()}


def curation_content(cfg: CurateConfig, source: Path) -> dict:
    """What decides a curation's result: the config but its output folder, and the inputs' checksums."""

    def checksum(path: str | Path | None) -> str | None:
        return file_sha256(Path(path)) if path is not None and Path(path).is_file() else None

    return {
        "config": cfg.model_dump(mode="json", exclude={"out"}),
        "source_train_csv_sha256": checksum(source / TRAIN_CSV),
        "real_csv_sha256": checksum(cfg.real.csv),
        "judge_weights_sha256": checksum(cfg.judge.weights_path),
    }


def curation_manifest(
    cfg: CurateConfig, source: Path, content: dict, verdicts: Verdicts, judge: dict, seconds: float
) -> dict:
    """The manifest fields a curation adds; the model and plan that made the images come from the source's
    manifest (a folder made outside medsd has none)."""
    made_by = read_manifest_file("synthetic", source)
    kept = int(verdicts.kept.sum())
    return {
        **{key: made_by[key] for key in ("model", "plan") if key in made_by},
        "curation": {
            "content": content,
            "source": str(source),
            "source_images": len(verdicts.kept),
            "kept": kept,
            "rejected": len(verdicts.kept) - kept,
            "rejected_per_label": verdicts.rejected_per_label(),
            "labels": list(verdicts.labels),
            "threshold": cfg.threshold,
            "judge": judge,
            "seconds": round(seconds, 3),
        },
    }
