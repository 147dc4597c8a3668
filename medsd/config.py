"""Every pydantic config of medsd, declared once, and the one loader (YAML file + key.path=value overrides).

The CLI, jobs/ and tests build configs only through :func:`load_config`; Ray workers receive
``cfg.model_dump(mode="json")`` and re-validate it. Defaults live here and nowhere else.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medsd.labels import CHEXPERT_OBSERVATIONS, COMPETITION_FIVE, NO_FINDING, PROJECTIONS, VIEWS, UncertaintyPolicy


class StrictModel(BaseModel):
    """Unknown keys are errors, so a typo in a YAML file never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Where a CheXpert-style dataset is and which part of it to use."""

    csv: str | None = Field(None, description="CheXpert-style CSV (Path + label columns); None means the phantom")
    root: str | None = Field(
        None, description="folder the CSV's Paths are relative to (the dataset folder or its parent)"
    )
    label_columns: list[str] | None = Field(
        None,
        description="label columns of a non-CheXpert image set (e.g. [RG, NRG]; its CSV is Path + these); "
        "None means the CheXpert schema",
    )
    observations: list[str] | None = Field(
        None, description="label columns to use, in order; None means every label of the schema"
    )
    uncertainty_policy: UncertaintyPolicy = Field(
        UncertaintyPolicy.IGNORE, description="what an uncertain (-1) label means: U-Ignore, U-Zeros or U-Ones"
    )
    name_uncertain: bool = Field(
        True,
        description="prompts word an uncertain (-1) finding 'possible <finding>' (under U-Ones: as present); "
        "false leaves it unnamed, so an image that may show it is prompted as if it did not",
    )
    views: list[Literal["Frontal", "Lateral"]] = Field(
        default_factory=lambda: list(VIEWS), description="keep only these Frontal/Lateral views"
    )
    projections: list[str] | None = Field(None, description="keep only these AP/PA values (None keeps all)")
    image_size_px: int = Field(64, ge=8, le=4096, description="square side images are resized to")
    resize_mode: Literal["pad", "crop"] = Field(
        "pad", description="aspect-preserving square: pad the short side or centre-crop the long one"
    )
    skip_bad: bool = Field(False, description="skip bad rows and images (counted in a report) instead of failing")

    @field_validator("projections")
    @classmethod
    def _known_projections(cls, value: list[str] | None) -> list[str] | None:
        unknown = [p for p in value or [] if p not in PROJECTIONS]
        if unknown:
            raise ValueError(f"data.projections: unknown {unknown}; expected a subset of {list(PROJECTIONS)}")
        return value


class PhantomConfig(StrictModel):
    """The procedural CheXpert-style dataset every workload runs on by default."""

    n_images: int = Field(2000, ge=1, description="images in train.csv + valid.csv together")
    image_size_px: int = Field(128, ge=32, le=1024, description="side of each square PNG")
    seed: int = Field(0, description="everything about the dataset follows from this seed")
    valid_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share of patients put in valid.csv")
    lateral_fraction: float = Field(0.15, ge=0.0, le=1.0, description="share of studies that also get a lateral view")


class AdapterConfig(StrictModel):
    """A LoRA or textual-inversion output loaded on top of a base model."""

    name: str = Field(description="what requests and per-label maps call this adapter", pattern=r"^[\w.-]+$")
    path: str = Field(
        description="a folder with pytorch_lora_weights.safetensors (LoRA) or learned_embeds.safetensors "
        "(textual inversion), as `medsd train` writes them"
    )


class ModelConfig(StrictModel):
    """Which Stable Diffusion pipeline to load and on what device and precision."""

    model: str = Field("tiny", description="'tiny' (the embedded model), a local diffusers folder, or a hub id")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="weights dtype for inference; auto is fp32 on CPU, bf16/fp16 on GPU"
    )
    cache_dir: str | None = Field(
        None, description="where the embedded tiny model is built and cached (default ~/.cache/medsd)"
    )
    adapters: list[AdapterConfig] = Field(
        default_factory=list, description="LoRA / textual-inversion outputs to load on top of the model"
    )


class DemoConfig(StrictModel):
    """`medsd demo`: the whole pipeline on the embedded defaults (phantom -> fine-tune -> generate -> evaluate).

    The stage configs are built from these few knobs (medsd/demo.py); each stage's own example YAML in
    configs/ shows the same run with every field. ``medsd demo --quick`` sets them to smoke sizes.
    """

    out: str = Field("medsd-demo", description="output folder of every demo stage")
    phantom: PhantomConfig = Field(
        default_factory=PhantomConfig, description="the 'real' data (read at the model's resolution)"
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model that is fine-tuned")
    labels: list[str] = Field(
        default_factory=lambda: list(COMPETITION_FIVE),
        description="labels generated, evaluated and drawn in the grid (training prompts name every finding)",
    )
    train_steps: int = Field(2000, ge=1, description="fine-tuning optimizer steps (label-conditional DreamBooth)")
    # Small batches, many steps: at the same images seen, 3000 x 16 beat 1500 x 32 on the phantom (bench/quality.py).
    train_batch_size: int = Field(16, ge=1, description="fine-tuning images per step")
    per_label: int = Field(100, ge=1, description="synthetic images per label and for No Finding")
    sample_steps: int = Field(20, ge=1, le=1000, description="denoising steps per synthetic image")
    guidance_scale: float = Field(3.0, ge=0.0, le=30.0, description="classifier-free guidance of every sample")
    eval_epochs: int = Field(4, ge=1, description="classifier epochs of each evaluation arm")
    grid_seed: int = Field(0, description="seed of the first sample-grid image (one seed per cell after it)")
    grid_steps: int = Field(20, ge=1, le=1000, description="denoising steps per sample-grid image")

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, value: list[str]) -> list[str]:
        unknown = [label for label in value if label not in CHEXPERT_OBSERVATIONS or label == NO_FINDING]
        if unknown or not value:
            raise ValueError(f"labels: got {value}; expected findings from {', '.join(CHEXPERT_OBSERVATIONS[1:])}")
        return value


# Bounds of one POST /v1/generate (issue 5): the API contract, shared by the request schema and ServeConfig.
MAX_IMAGES_PER_REQUEST = 8
MAX_STEPS_PER_REQUEST = 150
MAX_GUIDANCE_SCALE = 20.0


class ServeConfig(StrictModel):
    """`medsd serve` / `serve deploy`: the HTTP API, its protection, batching and replicas."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    api_key_env: str = Field(
        "MEDSD_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the API key; when it is set (non-empty) on the ingress, every "
        "route but /healthz requires the key",
    )
    max_batch_images: int = Field(
        16, ge=MAX_IMAGES_PER_REQUEST, le=256, description="images one generator replica runs in one batch"
    )
    # No wait by default: requests that arrive while a run is under way merge into the next run anyway
    # (BatchMerger), and a wait here only adds to every lone request's latency.
    batch_wait_timeout_s: float = Field(
        0.0, ge=0.0, le=10.0, description="how long a batch waits for more requests before it runs"
    )
    # Long enough for eight answered clients to come back through the proxy and ingress on a busy 2-core
    # machine (0.05 s split them: mean batch 6.7 of 8); it ends as soon as they are back.
    batch_linger_s: float = Field(
        0.15,
        ge=0.0,
        le=10.0,
        description="after a run, how long a partly filled next batch waits for the clients just answered to "
        "send again (after a run of several requests, or when requests are already waiting)",
    )
    # Twice a batch: the next batch fills inside the replica while one runs, instead of waiting in the router
    # (16 halved throughput at 32 clients: 11.3 vs 18.3 requests/s).
    max_ongoing_requests: int = Field(
        32, ge=1, description="requests one generator replica holds at once (running plus filling the next batch)"
    )
    max_queued_requests: int = Field(
        64, ge=1, description="requests waiting for a generator replica; beyond it the API answers 503"
    )
    retry_after_s: int = Field(5, ge=0, description="Retry-After header (seconds) of a 503 overload answer")
    ingress_max_ongoing_requests: int = Field(
        256, ge=1, description="HTTP requests one ingress replica holds at once (it only waits on generators)"
    )
    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest generator replicas")
    max_replicas: int = Field(1, ge=1, description="autoscaling: most generator replicas")
    target_ongoing_requests: float = Field(
        8.0, gt=0.0, description="autoscaling: ongoing requests per generator replica to scale towards"
    )
    num_cpus: float = Field(
        2.0, ge=0.0, description="CPUs per generator replica (Ray gives torch this many threads on CPU)"
    )
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per generator replica (1 on a GPU cluster)")
    max_prompt_chars: int = Field(500, ge=1, le=100_000, description="longest prompt or negative_prompt accepted")
    max_body_bytes: int = Field(16_384, ge=1024, description="largest request body accepted (413 above it)")
    default_steps: int = Field(
        25, ge=1, le=MAX_STEPS_PER_REQUEST, description="denoising steps when a request omits them"
    )
    default_guidance_scale: float = Field(
        4.0, ge=0.0, le=MAX_GUIDANCE_SCALE, description="classifier-free guidance when a request omits it"
    )
    default_sampler: str = Field("ddim", description="sampler when a request omits it (one of medsd.models.SAMPLERS)")

    @field_validator("max_ongoing_requests")
    @classmethod
    def _ongoing_fills_a_batch(cls, value: int, info) -> int:
        # Serve only warns when max_ongoing_requests < max_batch_size, and batches then never fill.
        batch_images = info.data.get("max_batch_images")
        if batch_images is not None and value < batch_images:
            raise ValueError(
                f"serve.max_ongoing_requests={value} is below serve.max_batch_images={batch_images}; "
                "a replica could never fill a batch"
            )
        return value

    @field_validator("max_replicas")
    @classmethod
    def _replica_range(cls, value: int, info) -> int:
        min_replicas = info.data.get("min_replicas")
        if min_replicas is not None and value < min_replicas:
            raise ValueError(f"serve.max_replicas={value} is below serve.min_replicas={min_replicas}")
        return value


class GenerateConfig(StrictModel):
    """`medsd generate`: a synthetic CheXpert-style dataset (PNG tree, parquet, train.csv, manifest).

    Every field but ``out`` and ``num_actors`` decides the images bit for bit, batch_size and the per-actor
    CPUs and GPUs included (batch shape, thread count and device change how floating-point sums are
    grouped), so a resumed run must use the same values; the manifest records them.
    """

    out: str = Field("medsd-synthetic", description="output folder or pyarrow filesystem URI (file://, s3://, ...)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    plan: Literal["per_label", "balanced", "match", "prompts"] = Field(
        "per_label",
        description="per_label: N single-finding images per label plus No Finding; balanced: N images per label "
        "plus No Finding, each a source.csv row positive for it (its other findings, view, sex and age come "
        "along); match: label vectors, views, sex and age sampled from source.csv; prompts: N images per prompt",
    )
    labels: list[str] = Field(
        default_factory=lambda: list(COMPETITION_FIVE),
        description="per_label, balanced: the observations to generate (CheXpert names); No Finding is always added",
    )
    per_label: int = Field(100, ge=1, description="per_label, balanced: images per label; prompts: images per prompt")
    n_images: int = Field(1000, ge=1, description="match: images sampled from the source CSV's rows")
    source: DataConfig = Field(
        default_factory=DataConfig, description="match, balanced: the real CheXpert-style CSV whose rows are sampled"
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="prompts: prompts in medsd's grammar, e.g. 'a frontal PA chest x-ray showing edema'",
    )
    views: dict[Literal["Frontal", "Lateral"], float] = Field(
        default_factory=lambda: {"Frontal": 1.0}, description="per_label: share of images per view (normalised)"
    )
    projection: Literal["AP", "PA"] | None = Field("PA", description="per_label: AP/PA of frontal images")
    identifier: str | None = Field(
        None, description="the DreamBooth identifier word the model was fine-tuned with (e.g. sks), put in prompts"
    )
    negative_prompt: str = Field("", description="what every image should not show; empty means unconditional")
    steps: int = Field(25, ge=1, le=1000, description="denoising steps per image")
    sampler: str = Field("dpm++", description="ddim, dpm++ (DPM-Solver++) or euler")
    guidance_scales: list[float] = Field(
        default_factory=lambda: [4.0],
        description="classifier-free guidance scales; several make a sweep (every image at each, tagged)",
    )
    seed: int = Field(0, ge=0, description="the plan's seed: every image's own seed derives from it and its id")
    label_adapters: dict[str, str] = Field(
        default_factory=dict,
        description="label -> name of an adapter in model.adapters to generate it with; others use the base model",
    )
    rows_per_shard: int = Field(
        256, ge=1, description="rows per parquet file; a file is written once all its images exist (unit of resume)"
    )
    batch_size: int = Field(8, ge=1, description="images per pipeline call (fixed by the plan, not by scheduling)")
    num_actors: int = Field(1, ge=1, description="generator actors (pipelines) in the Ray Data actor pool")
    num_gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs each actor reserves (1 on a GPU cluster)")
    cpus_per_actor: float = Field(
        2.0, gt=0.0, description="CPUs each actor reserves; without a GPU also its torch thread count"
    )

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, value: list[str]) -> list[str]:
        unknown = [label for label in value if label not in CHEXPERT_OBSERVATIONS]
        if unknown:
            expected = ", ".join(CHEXPERT_OBSERVATIONS)
            raise ValueError(f"generate.labels: unknown {unknown}; expected CheXpert observations: {expected}")
        duplicates = sorted({label for label in value if value.count(label) > 1})
        if duplicates:
            raise ValueError(f"generate.labels: {duplicates} listed more than once")
        return value

    @field_validator("guidance_scales")
    @classmethod
    def _guidance_in_range(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("generate.guidance_scales: empty; give at least one scale, e.g. [4.0]")
        problems = [
            f"generate.guidance_scales[{i}]: got {scale}; expected 0 <= scale <= {MAX_GUIDANCE_SCALE}"
            for i, scale in enumerate(value)
            if not 0.0 <= scale <= MAX_GUIDANCE_SCALE
        ]
        if len(set(value)) != len(value):
            problems.append(f"generate.guidance_scales: {value} repeats a scale (each gives the same images)")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("views")
    @classmethod
    def _views_have_weight(cls, value: dict[str, float]) -> dict[str, float]:
        if any(share < 0 for share in value.values()) or sum(value.values()) <= 0:
            raise ValueError(f"generate.views: got {value}; expected shares >= 0 with a positive sum")
        return value

    @model_validator(mode="after")
    def _plan_inputs_present(self) -> GenerateConfig:
        problems = []
        if self.plan in ("match", "balanced") and self.source.csv is None:
            problems.append(f"generate.source.csv: the {self.plan} plan samples a real CSV; set source.csv")
        if self.plan == "prompts" and not self.prompts:
            problems.append("generate.prompts: the prompts plan needs at least one prompt")
        adapter_names = {adapter.name for adapter in self.model.adapters}
        for label, adapter in self.label_adapters.items():
            if label not in CHEXPERT_OBSERVATIONS:
                problems.append(f"generate.label_adapters: unknown label {label!r}")
            if adapter not in adapter_names:
                problems.append(
                    f"generate.label_adapters.{label}: adapter {adapter!r} is not in model.adapters "
                    f"(names: {sorted(adapter_names) or 'none'})"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OptimConfig(StrictModel):
    """AdamW and its learning-rate schedule (fp32 master weights whatever the autocast dtype)."""

    learning_rate: float = Field(
        1e-4, gt=0.0, description="peak learning rate of the trained UNet / adapter / embeddings"
    )
    text_encoder_learning_rate: float | None = Field(
        None, gt=0.0, description="peak learning rate of the text encoder when it trains; None means learning_rate"
    )
    weight_decay: float = Field(1e-2, ge=0.0, description="AdamW decoupled weight decay")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW first-moment decay")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW second-moment decay")
    epsilon: float = Field(1e-8, gt=0.0, description="AdamW denominator epsilon")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="learning-rate shape after warmup: constant, linear to 0 or cosine to 0"
    )
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup from 0 to learning_rate")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="clip the gradient norm to this; None: no clipping")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches summed into one optimizer step")


class LoraConfig(StrictModel):
    """peft LoRA adapters (method=lora)."""

    rank: int = Field(4, ge=1, le=1024, description="LoRA rank r of every adapted layer")
    alpha: float = Field(4.0, gt=0.0, description="LoRA scale numerator: the update is (alpha / rank) * B @ A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch input")
    unet_target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet module names that get adapters (attention projections by default)",
    )
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        description="CLIP text-encoder module names that get adapters when train_text_encoder is true",
    )


class TextualInversionConfig(StrictModel):
    """New placeholder tokens, one per label (method=textual_inversion)."""

    num_vectors: int = Field(1, ge=1, le=16, description="embedding vectors per placeholder token")
    initializer_word: str = Field(
        "chest", min_length=1, description="each placeholder starts as the mean embedding of this word's tokens"
    )


class DreamBoothConfig(StrictModel):
    """Instance training with an identifier and prior preservation (conditioning=instance or per_label)."""

    identifier: str | None = Field(
        "sks", description="rare word put before the subject in instance prompts; None: no identifier"
    )
    prior_preservation: bool = Field(True, description="also train on a class set so the model keeps its prior")
    prior_loss_weight: float = Field(
        1.0, ge=0.0, description="weight of the class-set loss relative to the instance loss"
    )
    class_source: Literal["no_finding", "generated"] = Field(
        "no_finding", description="class set: real No Finding images from the data, or images the base model generates"
    )
    num_class_images: int = Field(100, ge=1, description="size of the class set (real images are sampled by seed)")
    class_sampling_steps: int = Field(25, ge=1, le=1000, description="denoising steps per generated class image")
    class_guidance_scale: float = Field(5.0, ge=0.0, le=30.0, description="guidance of the generated class images")


class CheckpointConfig(StrictModel):
    """Ray Train checkpoints: how often, how many, and where (a fixed run name makes a rerun resume)."""

    every_n_steps: int = Field(100, ge=1, description="save and report a checkpoint every this many optimizer steps")
    num_to_keep: int = Field(2, ge=1, description="newest checkpoints Ray keeps; older ones are deleted")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared on multi-node clusters); None means <out>/checkpoints"
    )
    run_name: str = Field(
        "medsd-train", pattern=r"^[\w.-]+$", description="Ray run name; rerunning with the same name resumes"
    )
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 is unlimited")


class ValidationConfig(StrictModel):
    """Sample grids (one row per label, fixed seeds) during and after training."""

    every_n_steps: int = Field(
        0, ge=0, description="grid every this many steps (with the checkpoint); 0: at the end only"
    )
    labels: list[str] | None = Field(None, description="grid rows; None means the trained labels plus No Finding")
    images_per_label: int = Field(4, ge=1, le=16, description="grid columns, one seed each")
    seed: int = Field(0, description="seed of the first column; column c uses seed + c in every row")
    steps: int = Field(20, ge=1, le=1000, description="denoising steps per grid image")
    guidance_scale: float = Field(4.0, ge=0.0, le=30.0, description="classifier-free guidance of the grid")
    sampler: Literal["ddim", "dpm++", "euler"] = Field(
        "dpm++", description="sampler of grids and generated class images"
    )


class ScalingConfig(StrictModel):
    """Ray Train workers (data parallel)."""

    num_workers: int = Field(
        1, ge=0, description="Ray Train workers; 0 runs the loop in the driver (debugging: Ray keeps no checkpoints)"
    )
    use_gpu: bool = Field(False, description="one GPU slice per worker and the nccl backend (gloo on CPU)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs per worker; torch uses this many threads")
    gpus_per_worker: float = Field(1.0, gt=0.0, description="GPUs per worker when use_gpu is true")


TRAIN_METHODS = ("dreambooth", "lora", "textual_inversion")


class TrainConfig(StrictModel):
    """`medsd train`: fine-tune a Stable Diffusion model on labelled radiographs with Ray Train."""

    out: str = Field("medsd-train", description="output folder: model, grids, metrics, checkpoints, caches")
    method: Literal["dreambooth", "lora", "textual_inversion"] = Field(
        "lora", description="what learns: dreambooth (the UNet), lora (adapters) or textual_inversion (new tokens)"
    )
    conditioning: Literal["labels", "instance", "per_label"] = Field(
        "labels",
        description="labels: every image with its labels' prompt; instance: one label with an identifier "
        "(DreamBooth); per_label: one instance run per label into <out>/<label-slug>/",
    )
    labels: list[str] | None = Field(
        None,
        description="labels prompts may name (labels), the one instance label (instance) or one run each "
        "(per_label); textual inversion adds one token per label. None: data.observations except No Finding",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="training images; data.csv None means the phantom")
    phantom: PhantomConfig = Field(
        default_factory=PhantomConfig, description="the phantom written to <out>/phantom when data.csv is None"
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model")
    train_text_encoder: bool = Field(False, description="dreambooth/lora: the text encoder (or its LoRA) learns too")
    max_steps: int = Field(
        1000, ge=1, description="optimizer steps in total (resumed runs count from their checkpoint)"
    )
    batch_size: int = Field(8, ge=1, description="images per worker per micro-batch")
    seed: int = Field(0, description="seeds data order, noise, dropout and initialisation")
    empty_prompt_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of samples trained with the empty prompt (classifier-free guidance)"
    )
    include_view: bool = Field(True, description="prompts name the view and projection (frontal PA, lateral)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    snr_gamma: float | None = Field(None, gt=0.0, description="min-SNR loss weighting gamma (5 is usual); None: off")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="offset noise scale (per-channel constant added)")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="what the UNet predicts; None means the base model's scheduler setting"
    )
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="EMA of the trained weights (e.g. 0.999); None: off"
    )
    cache_latents: bool = Field(
        True, description="encode images with the VAE once (Ray Data, parquet) and train from that"
    )
    cache_text_embeddings: bool = Field(
        True, description="encode prompts once when valid: frozen text encoder and no new tokens"
    )
    log_every_n_steps: int = Field(10, ge=1, description="log step, loss and samples/s every this many steps")
    log_sample_ids: bool = Field(False, description="record each step's sample ids in metrics.csv (audits resume)")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (method=lora)")
    textual_inversion: TextualInversionConfig = Field(
        default_factory=TextualInversionConfig, description="placeholder tokens (method=textual_inversion)"
    )
    dreambooth: DreamBoothConfig = Field(
        default_factory=DreamBoothConfig,
        description="identifier and prior preservation (conditioning=instance/per_label)",
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints and resume")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="sample grids")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        problems = []
        labels = self.labels or []
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            problems.append(f"labels: duplicates {duplicates}")
        if self.labels is not None and not self.labels:
            problems.append("labels: empty list; give at least one label or leave it unset")
        if self.conditioning == "instance" and self.labels is not None and len(self.labels) != 1:
            problems.append(f"labels: conditioning='instance' trains exactly one label, got {self.labels}")
        if self.conditioning != "labels" and "No Finding" in labels:
            problems.append(
                "labels: 'No Finding' cannot be an instance label; it is the class set of prior preservation"
            )
        if self.method == "textual_inversion" and self.train_text_encoder:
            problems.append(
                "train_text_encoder: textual_inversion trains only its placeholder embeddings; set it false"
            )
        if self.method == "textual_inversion" and self.conditioning != "labels" and self.dreambooth.prior_preservation:
            problems.append(
                "dreambooth.prior_preservation: class prompts hold no placeholder token, so textual inversion learns "
                "nothing from them; set dreambooth.prior_preservation=false"
            )
        if self.optim.warmup_steps >= self.max_steps:
            problems.append(f"optim.warmup_steps: {self.optim.warmup_steps} must be below max_steps={self.max_steps}")
        if self.scaling.use_gpu and self.model.device == "cpu":
            problems.append("scaling.use_gpu: true but model.device='cpu'; set model.device to auto or cuda")
        if self.model.device == "cuda" and not self.scaling.use_gpu and self.scaling.num_workers > 0:
            problems.append("model.device: 'cuda' needs scaling.use_gpu=true, or Ray gives the workers no GPU")
        if self.model.adapters:
            problems.append("model.adapters: training starts from a base model; load adapters when generating")
        if self.data.observations is not None:
            for field, names in (("labels", labels), ("validation.labels", self.validation.labels or [])):
                # No Finding may title a grid row without being a training column: its prompt names no finding.
                unknown = [n for n in names if n not in self.data.observations and n != "No Finding"]
                if unknown:
                    problems.append(f"{field}: {unknown} are not in data.observations {self.data.observations}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_config(config_class: type[ConfigT], path: str | Path | None = None, overrides: list[str] = ()) -> ConfigT:
    """Build ``config_class`` from an optional YAML file plus ``key.path=value`` overrides.

    Values are parsed as YAML scalars (``3``, ``true``, ``[a, b]``). Unknown keys raise ValueError
    naming the key and the nearest valid one.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}")
        raw = loaded
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r}: expected key.path=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    _check_keys(config_class, raw, prefix="")
    try:
        return config_class.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors())
        source = f" in {path}" if path is not None else ""
        raise ValueError(f"invalid {config_class.__name__}{source}: {problems}") from None


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a group of settings")
    target[leaf] = value


def _check_keys(config_class: type[BaseModel], raw: dict[str, Any], prefix: str) -> None:
    """Reject unknown keys with the nearest valid spelling, recursing into nested configs."""
    fields = config_class.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            nearest = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{nearest[0]}'?" if nearest else f"; valid keys: {', '.join(fields)}"
            raise ValueError(f"unknown config key {dotted!r}{hint}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            _check_keys(annotation, value, prefix=f"{dotted}.")


EVALUATION_ARMS = ("real", "synthetic", "mixed", "pretrain_finetune")


class EvaluateConfig(StrictModel):
    """`medsd evaluate`: does the synthetic data help? Classifier AUC per arm on held-out real images, plus
    fidelity, diversity and a memorization audit of the synthetic images."""

    out: str = Field("medsd-evaluate", description="output folder: results.csv, report.md, figures, config")
    real: DataConfig = Field(
        default_factory=DataConfig,
        description="real training images; its uncertainty policy, views and image size apply to every set "
        "(leave real.observations unset: `labels` chooses the columns)",
    )
    labels: list[str] = Field(
        default_factory=lambda: list(COMPETITION_FIVE),
        description="observations evaluated, in order: columns every CSV (real, test, synthetic) must have",
    )
    test_csv: str | None = Field(
        None, description="held-out real CSV every arm is tested on; None: hold out test_fraction of real patients"
    )
    test_root: str | None = Field(
        None, description="folder test_csv's Paths are relative to; None means real.root (else test_csv's folder)"
    )
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="without test_csv: share of real patients held out as the test split"
    )
    synthetic: list[str] = Field(
        default_factory=list,
        description="synthetic dataset folders (`medsd generate` output or train.csv + images); the first trains "
        "the arms, several (e.g. one per checkpoint) are compared",
    )
    guidance_scale: float | None = Field(
        None, description="arms train on this guidance scale of the first synthetic folder; None: all its images"
    )
    arms: list[Literal["real", "synthetic", "mixed", "pretrain_finetune"]] = Field(
        default_factory=lambda: list(EVALUATION_ARMS),
        description="classifiers to train: real only, synthetic only, real + synthetic, synthetic then real",
    )
    sweep: bool = Field(
        True,
        description="with several synthetic folders or guidance scales, also train a synthetic-only arm on each",
    )
    equal_size: bool = Field(False, description="subsample each synthetic training set to the real image count")
    real_max_images: int | None = Field(
        None,
        ge=2,
        description="train on a seeded subsample of at most this many real images (where real labels are scarce); "
        "the budget is epochs x the images kept; None: every real training image",
    )
    architecture: Literal["resnet18", "resnet50"] = Field("resnet18", description="torchvision ResNet, 1-channel")
    weights_path: str | None = Field(
        None, description="starting weights of every arm (a local state_dict file); None: random initialisation"
    )
    epochs: int = Field(
        3, ge=1, description="passes over the real training set; every arm sees as many images in total (budget)"
    )
    batch_size: int = Field(16, ge=2, description="images per classifier optimizer step")
    learning_rate: float = Field(1e-3, gt=0.0, description="peak AdamW learning rate (cosine to zero)")
    seed: int = Field(0, description="seeds initialisation, data order, subsampling and the bootstrap; same per arm")
    pretrain_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="pretrain_finetune: share of the budget spent on synthetic pre-training"
    )
    bootstrap_samples: int = Field(
        1000, ge=0, description="bootstrap resamples of the test split for AUC intervals; 0: no intervals"
    )
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="coverage of the bootstrap intervals")
    extractor: Literal["classifier", "inception_v3", "densenet121"] = Field(
        "classifier",
        description="features of the Frechet distance, k-NN precision/recall and memorization: the real arm's "
        "penultimate layer, or a torchvision network loaded from extractor_weights",
    )
    extractor_weights: str | None = Field(
        None, description="local state_dict of the inception_v3 or densenet121 extractor (nothing is downloaded)"
    )
    fidelity_max_images: int = Field(
        5000, ge=2, description="images per set (seeded subsample) in the Frechet distance and k-NN metrics"
    )
    knn_k: int = Field(3, ge=1, description="k of the k-NN precision/recall radii (Kynkaanniemi et al. 2019)")
    diversity_images_per_prompt: int = Field(
        4, ge=2, description="images per prompt compared pairwise by MS-SSIM (RoentGen uses 4)"
    )
    diversity_max_prompts: int = Field(50, ge=1, description="prompts per set in the MS-SSIM diversity")
    memorization_feature_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="feature cosine to the nearest training image that counts as a copy; None: the highest any "
        "held-out real image reaches (images of one domain can be alike without being copies)",
    )
    memorization_pixel_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="pixel correlation to the nearest training image that counts as a copy; None: the highest "
        "any held-out real image reaches",
    )
    memorization_limit: float = Field(
        0.01, ge=0.0, le=1.0, description="share of memorized synthetic images above which the report flags the set"
    )
    memorization_top_pairs: int = Field(12, ge=1, description="most similar synthetic/training pairs shown")
    samples_per_label: int = Field(8, ge=1, le=32, description="columns of the label x samples grid")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available")
    cpus_per_arm: float = Field(1.0, gt=0.0, description="CPUs each arm task reserves (its torch threads on CPU)")
    gpus_per_arm: float = Field(0.0, ge=0.0, description="GPUs each arm task reserves (1 on a GPU cluster)")

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        problems = []
        if self.real.csv is None:
            problems.append("evaluate.real.csv: not set; pass --real CSV, the real training CSV")
        if self.real.observations is not None:
            problems.append("evaluate.real.observations: set evaluate.labels instead (it applies to every set)")
        problems += _label_problems("evaluate", self.labels, self.real)
        if not self.synthetic:
            problems.append("evaluate.synthetic: no folder given; pass --synthetic DIR (a `medsd generate` output)")
        if not self.arms:
            problems.append(f"evaluate.arms: empty; choose from {list(EVALUATION_ARMS)}")
        if len(set(self.arms)) != len(self.arms):
            problems.append(f"evaluate.arms: {self.arms} repeats an arm")
        if self.extractor == "classifier" and "real" not in self.arms:
            problems.append("evaluate.arms: the classifier extractor uses the real arm's features; keep 'real'")
        if self.extractor != "classifier" and self.extractor_weights is None:
            problems.append(f"evaluate.extractor_weights: {self.extractor} needs a local weights file")
        problems += _device_problems("evaluate", self.device, "gpus_per_arm", self.gpus_per_arm)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _label_problems(section: str, labels: list[str], real: DataConfig) -> list[str]:
    """Labels that are not distinct names of the real data's schema."""
    schema_labels = real.label_columns or list(CHEXPERT_OBSERVATIONS)
    unknown = [label for label in labels if label not in schema_labels]
    if unknown or not labels or len(set(labels)) != len(labels):
        return [
            f"{section}.labels: got {labels}; expected distinct names from {schema_labels}"
            + (f" ({unknown} unknown)" if unknown else "")
        ]
    return []


def _device_problems(section: str, device: str, gpus_field: str, gpus: float) -> list[str]:
    """A device choice that Ray's GPU reservation contradicts (a task sees only the GPUs it reserved)."""
    problems = []
    if device == "cuda" and gpus == 0:
        problems.append(f"{section}.device: 'cuda' needs {gpus_field} > 0, or Ray gives the task no GPU")
    if gpus > 0 and device == "cpu":
        problems.append(f"{section}.{gpus_field}: GPUs reserved but device='cpu'; set device to auto or cuda")
    return problems


class JudgeConfig(StrictModel):
    """The classifier that judges synthetic images for `medsd curate`: trained on the real images, or loaded."""

    weights_path: str | None = Field(
        None,
        description="a judge an earlier curation saved (its judge.safetensors, same labels and image size); "
        "None: train one on `real`",
    )
    architecture: Literal["resnet18", "resnet50"] = Field("resnet18", description="torchvision ResNet, 1-channel")
    # A judge should be as good as the real data allows, not as cheap as an evaluation arm: on the phantom a
    # 6-epoch judge reaches 0.998 mean AUC on held-out patients, a 3-epoch one 0.98.
    epochs: int = Field(6, ge=1, description="passes over the real images while the judge trains")
    batch_size: int = Field(16, ge=2, description="images per optimizer step")
    learning_rate: float = Field(1e-3, gt=0.0, description="peak AdamW learning rate (cosine to zero)")
    seed: int = Field(0, description="seeds the judge's initialisation and data order")


class CurateConfig(StrictModel):
    """`medsd curate`: keep the synthetic images whose labels a classifier trained on real images agrees with,
    as a new synthetic dataset folder; every image's verdict is listed in curation.csv."""

    out: str = Field("medsd-curated", description="the curated dataset folder (must be new or empty)")
    synthetic: str | None = Field(None, description="the synthetic dataset folder to curate (`medsd generate` output)")
    real: DataConfig = Field(
        default_factory=DataConfig,
        description="real images the judge trains on; their uncertainty policy and image size apply to the "
        "synthetic labels too, their views do not (every synthetic image is judged: train the judge on the views "
        "the synthetic set has); leave real.observations unset: `labels` chooses the columns",
    )
    labels: list[str] = Field(
        default_factory=lambda: list(COMPETITION_FIVE),
        description="labels the judge learns and checks, in order: columns of the real and the synthetic CSV",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="the judge classifier")
    threshold: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="an image is kept when, for every checked label, the judge's probability is at least this "
        "where its CSV says 1.0 and below it where it says 0.0 (uncertain labels the policy masks are not checked)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available")
    cpus: float = Field(2.0, gt=0.0, description="CPUs the judge's Ray task reserves (its torch threads on CPU)")
    gpus: float = Field(0.0, ge=0.0, description="GPUs the judge's Ray task reserves (1 on a GPU cluster)")

    @model_validator(mode="after")
    def _consistent(self) -> CurateConfig:
        problems = []
        if self.synthetic is None:
            problems.append("curate.synthetic: not set; pass --synthetic DIR, a `medsd generate` output")
        if self.real.csv is None and self.judge.weights_path is None:
            problems.append("curate.real.csv: not set; pass --real CSV (the judge trains on it) or judge.weights_path")
        if self.real.observations is not None:
            problems.append("curate.real.observations: set curate.labels instead (it applies to both sets)")
        problems += _label_problems("curate", self.labels, self.real)
        problems += _device_problems("curate", self.device, "gpus", self.gpus)
        if problems:
            raise ValueError("; ".join(problems))
        return self
