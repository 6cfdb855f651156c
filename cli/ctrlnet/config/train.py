"""`train`: everything the trainer needs. Defaults follow diffusers' train_controlnet.py.

docs/config.md maps each of that script's flags to a key here (ctrlnet.config.diffusers_flags).
"""

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ctrlnet.config.bounds import (
    MAX_ADHERENCE_ROWS,
    MAX_BATCH_SIZE,
    MAX_CONTROL_MODES,
    MAX_COUNT,
    MAX_EPOCHS,
    MAX_IMAGES,
    MAX_INFERENCE_STEPS,
    MAX_LAYERS,
    MAX_RESOLUTION,
    MAX_ROWS,
    MAX_SECONDS,
    MAX_SHUFFLE_BUFFER,
    MAX_STEPS,
    MAX_TEXT_TOKENS,
    MAX_WORKERS,
    SEED_RANGE,
)
from ctrlnet.config.credentials import credential_kind, refuse_credentials
from ctrlnet.config.prepare import AnnotatorName, AnnotatorsConfig, PrepareConfig
from ctrlnet.config.section import Section

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DEMO_BASE = "builtin:demo"
"""model.base of the pretrained demo base shipped in the package (ctrlnet_trainer/demo_weights/)."""

FLOW_FAMILIES = ("sd3", "flux")
"""The flow-matching families (rectified-flow objective, transformer denoiser)."""

LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


class ModelConfig(Section):
    base: str | None = None
    """The base model (SD1.x/2.x, SDXL, SD3/SD3.5 or Flux.1): a local diffusers folder, an fsspec
    URL or a hub id; `builtin:demo`: the tiny 64 px base shipped with ctrlnet, pretrained on the
    synthetic circles in 12 colours (the demo's). Unset: a tiny random-init base of `family` built
    in code (for tests; SD-shaped when `family` is auto)."""
    family: Literal["auto", "sd", "sdxl", "sd3", "flux"] = "auto"
    """Model family; `auto` reads it from the base: model_index.json's pipeline class, else the
    components present (`transformer/` with a FluxTransformer2DModel or SD3Transformer2DModel
    config, a `text_encoder_2/` or a UNet with `addition_embed_type: text_time` for SDXL)."""
    vae: str | None = None
    """A replacement VAE (a diffusers AutoencoderKL folder, fsspec URL or hub id), e.g. the fp16-fix
    SDXL VAE; unset: the base's `vae/`. Under fp16 mixed precision an SDXL VAE whose config sets
    `force_upcast` (SDXL's own) stays in fp32, as it overflows in fp16; one without it (the
    fp16-fix VAE) runs in fp16. Under bf16 (fp32's range) every VAE runs in bf16."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base."""
    variant: str | None = None
    """Weight file variant of the base, e.g. `fp16`."""
    tokenizer: str | None = None
    """Tokenizer name or path when it is not the base's `tokenizer/` folder (SDXL: the first
    tokenizer; the second always comes from `tokenizer_2/`)."""
    controlnet: str | None = None
    """Existing ControlNet weights to start from; unset: initialised from the base UNet."""
    cache_dir: str | None = None
    """Where downloaded models and datasets are cached."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Training target of SD1.x/2.x and SDXL; unset: the base scheduler's own `prediction_type`
    (SD3 and Flux.1 are trained on the flow-matching velocity, `noise - latents`)."""
    controlnet_layers: int | None = Field(default=None, gt=0, le=MAX_LAYERS)
    """SD3/Flux.1: transformer blocks of a new ControlNet, copied from the base's first ones (SD3:
    joint blocks, `num_layers`; Flux.1: double-stream blocks, `num_double_layers`); unset: SD3 12
    (diffusers' from_transformer), at most the base's blocks but its last; Flux.1 4 (the script's)."""
    controlnet_single_layers: int | None = Field(default=None, ge=0, le=MAX_LAYERS)
    """Flux.1: single-stream blocks of a new ControlNet (`num_single_layers`); unset: 4 (the script's)."""
    max_sequence_length: int | None = Field(default=None, gt=0, le=MAX_TEXT_TOKENS)
    """SD3/Flux.1: T5 tokens per prompt, in training and in the pipeline that samples; unset: the
    family pipeline's default (SD3 256, Flux.1 512), so the ControlNet trains on what it is fed."""
    guidance_scale: float = Field(default=3.5, ge=0.0, le=100.0, allow_inf_nan=False)
    """Flux.1-dev (a base with a guidance embedding): the distilled guidance given to the
    transformer and the ControlNet in training, and to the pipeline in validation."""
    control_modes: list[str] = Field(default_factory=list, max_length=MAX_CONTROL_MODES)
    """Flux.1 union ControlNet: the condition types one ControlNet learns, in their id order (e.g.
    [canny, tile, depth, blur, pose, gray, lq], InstantX's union); each row's type is in
    data.control_mode_column. Empty: one condition type (a plain ControlNet)."""
    upcast_vae: bool = False
    """Run the VAE in fp32 under mixed precision (SD3's `--upcast_vae`)."""


class DataConfig(Section):
    dataset: str | None = None
    """Training data: a hub dataset name, a local path (parquet file or folder, imagefolder with
    metadata.jsonl, or a .jsonl / .json file of rows whose image columns hold paths relative to
    that file) or an fsspec URL (parquet, .jsonl or .json). Unset: a synthetic fill50k look-alike
    made in code."""
    config_name: str | None = None
    """The dataset's config name, when it has several."""
    split: str = "train"
    """Split to train on."""
    image_column: str = "image"
    """Column holding the target image."""
    conditioning_image_column: str = "conditioning_image"
    """Column holding the conditioning image (an image, or a file path relative to the data)."""
    caption_column: str = "text"
    """Column holding a caption or a list of captions."""
    max_train_samples: int | None = Field(default=None, gt=0, le=MAX_ROWS)
    """Train on this many examples only (the same subset on every rank); at most 100,000,000."""
    proportion_empty_prompts: float = Field(default=0.0, ge=0.0, le=1.0)
    """Fraction of captions replaced by the empty string."""
    resolution: int = Field(default=512, gt=0, le=MAX_RESOLUTION, json_schema_extra={"multipleOf": 8})
    """Training resolution in pixels (a multiple of 8, at most 4096): resize the short side, then center-crop."""
    interpolation: Literal["auto", "nearest", "bilinear", "bicubic", "lanczos"] = "auto"
    """Resampling filter of that resize; `auto`: bilinear for SD1.x/2.x (as train_controlnet.py),
    lanczos for SDXL (as train_controlnet_sdxl.py)."""
    crops_coords_top_left: list[int] | None = None
    """SDXL: one (top, left) crop offset given to the UNet's `time_ids` for every image; unset:
    each image's own offset from the center crop, with its own original size (what SDXL was
    trained with; the reference passes (0, 0) and the training resolution for every image)."""
    num_workers: int = Field(default=0, ge=0, le=MAX_WORKERS)
    """Worker processes per rank that decode and transform images ahead of the step (map-style
    and streamed data alike); 0: in the training process; at most 256."""
    streaming: bool = False
    """Stream the dataset instead of downloading it whole (hub or remote data)."""
    shuffle_buffer: int = Field(default=1000, gt=0, le=MAX_SHUFFLE_BUFFER)
    """Shuffle buffer size when streaming (rows, at most 10,000,000)."""
    synthetic_rows: int = Field(default=2000, gt=0, le=MAX_ROWS)
    """Rows of the synthetic dataset used when `dataset` is unset (at most 100,000,000)."""
    synthetic_colours: Literal["css", "demo"] = "css"
    """Palette of the synthetic rows: `css`, fill50k's look (fill and background from the 147 CSS
    colours); `demo`, the 12 well-separated colours the shipped demo base was pretrained on."""
    skip_bad_rows: bool = False
    """Skip rows whose image or conditioning image cannot be read: each is named on stderr and
    counted in metrics.jsonl (`skipped_rows`, per logged window). Off: such a row stops the run
    with one line naming it."""
    control_mode_column: str | None = None
    """With model.control_modes (a union ControlNet): the column naming each row's condition type
    (one of model.control_modes, or its index)."""
    cache: str | None = None
    """Folder or URL of a precomputed cache of this data (`ctrlnet precompute` writes it): training
    reads the VAE latent distributions and text embeddings from it instead of encoding every step.
    It must match this config (base, resolution, dataset, rows, seed, dtype), else the run stops."""

    @field_validator("crops_coords_top_left")
    @classmethod
    def _offsets(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or min(v) < 0 or max(v) > MAX_RESOLUTION):
            raise ValueError(f"must be two offsets >= 0 and <= {MAX_RESOLUTION} in pixels, [top, left], e.g. [0, 0]")
        return v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), e.g. {max(8, v // 8 * 8)}")
        return v


class OptimConfig(Section):
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = "adamw"
    """AdamW (fused where the device supports it), bitsandbytes' 8-bit AdamW, or transformers'
    Adafactor (factored second moments: far less optimizer memory; at `learning_rate` as given,
    with `weight_decay`, no relative step or parameter scaling; the `adam_*` keys do not apply)."""
    learning_rate: float = Field(default=5e-6, gt=0)
    """Peak learning rate (after warmup)."""
    scale_lr: bool = False
    """Multiply the learning rate by processes x accumulation steps x batch size."""
    lr_scheduler: LrScheduler = "constant"
    """Learning-rate schedule."""
    lr_warmup_steps: int = Field(default=500, ge=0, le=MAX_STEPS)
    """Warmup steps (optimizer steps, at most 100,000,000)."""
    lr_num_cycles: int = Field(default=1, ge=1, le=MAX_COUNT)
    """Hard restarts for `cosine_with_restarts` (at most 10,000)."""
    lr_power: float = 1.0
    """Power of the `polynomial` schedule."""
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW beta1 (first-moment decay)."""
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    """AdamW beta2 (second-moment decay)."""
    weight_decay: float = Field(default=1e-2, ge=0)
    """AdamW decoupled weight decay."""
    adam_epsilon: float = Field(default=1e-8, gt=0)
    """AdamW epsilon (numerical floor of the denominator)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this; unset: no clipping."""
    set_grads_to_none: bool = False
    """Free gradients between steps instead of zeroing them (saves memory)."""


class LoopConfig(Section):
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    """Seed for weights init, data order, noise and timesteps (a 64-bit integer); unset: one is drawn and recorded."""
    batch_size: int = Field(default=4, gt=0, le=MAX_BATCH_SIZE)
    """Batch size per process (at most 65,536)."""
    num_epochs: int = Field(default=1, gt=0, le=MAX_EPOCHS)
    """Epochs to train when `max_steps` is unset (at most 1,000,000)."""
    max_steps: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    """Optimizer steps to train (at most 100,000,000); overrides `num_epochs`."""
    gradient_accumulation_steps: int = Field(default=1, gt=0, le=MAX_BATCH_SIZE)
    """Micro-batches per optimizer step (at most 65,536)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~20% slower): the ControlNet's and,
    for SDXL, SD3 and Flux.1, the frozen denoiser's, which the backward runs through (as
    train_controlnet_sdxl.py and train_controlnet_flux.py do)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Frozen models in this dtype, ControlNet master weights in fp32 under autocast."""
    allow_tf32: bool = False
    """Allow TF32 matmuls on Ampere and newer GPUs."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention kernel: PyTorch scaled_dot_product_attention, or xformers (must be installed)."""
    snr_gamma: float | None = Field(default=None, gt=0)
    """Min-SNR-gamma loss weighting (5.0 is the paper's choice); unset: plain MSE. SD1.x/2.x and
    SDXL only (flow matching weights its timesteps by `weighting_scheme`)."""
    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = "logit_normal"
    """SD3/Flux.1: how training timesteps are weighted (diffusers' SD3 recipe): `logit_normal`
    and `mode` draw sigma from that density; `cosmap` and `sigma_sqrt` draw it uniformly and weight
    the loss; `none`: uniform and unweighted."""
    logit_mean: float = Field(default=0.0, ge=-10.0, le=10.0, allow_inf_nan=False)
    """Mean of the `logit_normal` density."""
    logit_std: float = Field(default=1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    """Standard deviation of the `logit_normal` density."""
    mode_scale: float = Field(default=1.29, ge=-10.0, le=10.0, allow_inf_nan=False)
    """Scale of the `mode` density."""
    precondition_outputs: bool | None = None
    """SD3/Flux.1: EDM-style preconditioning, the loss taken on `x_t - sigma * v` against the
    clean latents (the velocity loss weighted by sigma squared); unset: on for SD3 (as
    train_controlnet_sd3.py), off for Flux.1 (as train_controlnet_flux.py)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; `auto` uses CUDA when present."""
    compile: Literal["auto", "off", "regional", "full"] = "auto"
    """torch.compile of the ControlNet and the frozen UNet: `regional` compiles each of their down,
    mid and up blocks (the glue between them stays eager), `full` each whole model; `auto`:
    regional on CUDA, off on the CPU. Where compiling cannot work (no C compiler, no triton) the
    run says so in one line and trains eagerly. Validation samples always run eagerly."""
    compile_cache: str | None = None
    """Local folder of the persistent compile cache (inductor's FX graph and AOT autograd caches),
    so a restarted pod does not compile again; unset: `<model.cache_dir>/torch-compile` when
    model.cache_dir is set, else inductor's default (TORCHINDUCTOR_CACHE_DIR, or under /tmp)."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """channels_last memory format for the UNet, ControlNet and VAE (faster convolutions on
    tensor cores); `auto`: on for CUDA, off on the CPU."""
    fp8: Literal["off", "controlnet", "unet", "both"] = "off"
    """FP8 matmuls (torchao float8 training) in the attention blocks' Linear layers of the chosen
    model(s). Needs a GPU of compute capability 8.9 or newer (Ada, Hopper), where torchao must be
    installed (`pip install 'ctrlnet[fp8]'`); elsewhere the run says it is off and why, and trains
    without it. Best with `compile` on."""

    @field_validator("compile_cache")
    @classmethod
    def _local_folder(cls, v: str | None) -> str | None:
        if v and "://" in v and not v.startswith("file://"):
            raise ValueError("must be a local folder (e.g. on the cache volume), not an object-storage URL")
        return v


class DistributedConfig(Section):
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """Data parallelism: PyTorch DDP, or DeepSpeed ZeRO."""
    zero_stage: Literal[1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state on the CPU."""
    collective_timeout_s: int = Field(default=1800, gt=0, le=MAX_SECONDS)
    """How long a process waits in a collective (an all-reduce, a gather) for the others before the
    run fails (the process group's timeout; NCCL's watchdog). Validation samples on every process,
    so the others wait at most one image's sampling for the slowest; a validation slower than half
    of this is warned about (with what to lower, or to raise this to)."""


class CheckpointConfig(Section):
    every_steps: int = Field(default=500, gt=0, le=MAX_STEPS)
    """Save a resumable checkpoint every N optimizer steps (at most 100,000,000)."""
    total_limit: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    """Keep at most this many checkpoints (up to 10,000) (oldest removed after a newer one is committed)."""
    resume: str | None = None
    """`latest`, or a checkpoint path/URL, to continue a run at the exact batch where it stopped."""
    on_corrupt: Literal["fail", "previous"] = "fail"
    """A committed checkpoint that cannot be read (damaged weights or state): `fail` names it and
    stops; `previous` names it and resumes from the committed checkpoint before it instead."""
    upload_attempts: int = Field(default=5, gt=0, le=MAX_COUNT)
    """Object storage: tries per checkpoint upload (at most 10,000) (waiting `upload_backoff_s`, doubled each time,
    between tries) before that checkpoint is given up: never committed, training goes on."""
    upload_backoff_s: float = Field(default=2.0, ge=0, le=MAX_SECONDS)
    """Object storage: wait before the second try of a failed checkpoint upload; doubles per try (at most 60 s)."""
    upload_timeout_s: float = Field(default=120.0, gt=0, le=MAX_SECONDS)
    """Object storage: connect and read timeout of each request of a checkpoint upload (at most a year); a file's
    whole upload fails after this plus 1 s per MiB (a store that stopped answering)."""
    max_failed_uploads: int = Field(default=3, gt=0, le=MAX_COUNT)
    """Object storage: stop the run (exit 1, resumable from the last committed checkpoint) after
    this many checkpoints in a row could not be uploaded."""
    final_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Precision of the final ControlNet (`controlnet/` under the output, and what the hub gets):
    its weights are cast to it once training ends. Checkpoints always hold the fp32 master weights,
    so a resume is exact."""


class ValidationConfig(Section):
    prompts: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
    """Validation prompts (at most 256, each at most 4096 characters); one prompt pairs with every image."""
    images: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
    """Conditioning images (paths or URLs, at most 256); one image pairs with every prompt."""
    num_images: int = Field(default=4, gt=0, le=MAX_IMAGES)
    """Images generated per (prompt, conditioning image) pair (at most 256)."""
    every_steps: int = Field(default=100, gt=0, le=MAX_STEPS)
    """Run validation every N optimizer steps (and once at the end); at most 100,000,000."""
    num_inference_steps: int = Field(default=20, gt=0, le=MAX_INFERENCE_STEPS)
    """Denoising steps per validation image (UniPC; at most 1000)."""
    adherence_rows: int = Field(default=16, ge=0, le=MAX_ADHERENCE_ROWS)
    """Synthetic data only: held-out rows sampled (one image each) and scored for condition
    adherence at each validation: the IoU of the drawn circle with its outline's disk, and with
    another row's (chance), to metrics.jsonl, the tracker and the loss plot; 0: off; at most 100,000."""
    control_modes: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
    """Union ControlNet (model.control_modes): the condition type of each validation image, or
    one for all."""
    fidelity: list[AnnotatorName] | None = None
    """Control fidelity at each validation, per annotator named: each generated image is
    re-annotated (with `train.annotators`' parameters) and scored against its own condition
    (canny: edge F1 within `tolerance_px`; depth: Spearman rank correlation; segmentation: mIoU)
    and against another pair's (chance), to metrics.jsonl, the tracker and the plot. Unset:
    `prepare.annotator` when `prepare.source` is set (the data ctrlnet prepared), else none; []: off."""
    at_start: bool = False
    """Also validate before the first step: the samples (and, on the synthetic data, the condition
    adherence) of the untrained ControlNet, whose zero convolutions leave the base alone: the
    baseline the trained one is compared with."""

    @model_validator(mode="after")
    def _pairs(self) -> "ValidationConfig":
        p, i = len(self.prompts), len(self.images)
        if (p == 0) != (i == 0):
            missing = "images" if i == 0 else "prompts"
            raise ValueError(
                f"validation.prompts has {p} and validation.images has {i}: set validation.{missing} too, or neither"
            )
        if p and i and p != i and 1 not in (p, i):
            raise ValueError(
                f"validation.prompts has {p} and validation.images has {i}: give the same number, or exactly one of either"
            )
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """(prompt, image) pairs, broadcasting a single prompt or image as the reference does."""
        prompts, images = self.prompts, self.images
        if len(prompts) == 1:
            prompts = prompts * len(images)
        if len(images) == 1:
            images = images * len(prompts)
        return list(zip(prompts, images, strict=False))


class LoggingConfig(Section):
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Experiment tracker besides metrics.jsonl."""
    logging_dir: str = "logs"
    """TensorBoard folder, relative to the output."""
    tracker_project_name: str = "train_controlnet"
    """Project name given to the tracker."""
    every_steps: int = Field(default=1, gt=0, le=MAX_STEPS)
    """Write a metrics line every N optimizer steps (at most 100,000,000)."""


class HubConfig(Section):
    push: bool = False
    """Upload the final ControlNet (never intermediate checkpoints) to a hub model repo."""
    model_id: str | None = None
    """Hub repo id; unset: the output folder's name."""
    token_env: str = "HF_TOKEN"
    """Environment variable that holds the hub token (the token itself never goes in a config)."""
    private: bool = False
    """Create the hub repo as private."""

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        # Never quote the value: a token pasted here instead of a variable's name is a common slip.
        kind = credential_kind(v, blobs=True)
        if kind:
            raise ValueError(
                f"looks like {kind} (not shown): give the name of the environment variable that holds "
                "the token, e.g. HF_TOKEN, and export the token in it (on a cluster: cluster.secrets.hub_token)"
            )
        if not ENV_NAME.match(v):
            raise ValueError("must be an environment variable name (letters, digits and '_'), e.g. HF_TOKEN")
        return v


class TrainConfig(Section):
    output: str = "controlnet-model"
    """Run prefix (a folder or fsspec URL): checkpoints/, controlnet/, samples/, metrics.jsonl."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    annotators: AnnotatorsConfig = Field(default_factory=AnnotatorsConfig)

    def fidelity_annotators(self) -> list[str]:
        """The annotators validation scores control fidelity with (validation.fidelity, resolved)."""
        if self.validation.fidelity is not None:
            return list(dict.fromkeys(self.validation.fidelity))
        return [self.prepare.annotator] if self.prepare.source else []

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        # Before the fields: this section becomes the job's ConfigMap, readable by anyone who can
        # read the namespace, and its values reach logs; `s3://KEY:SECRET@bucket` must stop here.
        refuse_credentials(data, "train")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        # Rules across sections, here so `ctrlnet validate` and `config show` catch them before a pod starts.
        if self.model.family == "sdxl" and self.data.cache:
            raise ValueError(
                "data.cache with model.family sdxl: the precompute cache holds SD1.x/2.x embeddings only; "
                "unset data.cache (SDXL encodes online)"
            )
        flow = self.model.family in FLOW_FAMILIES
        if flow and self.data.resolution % 16:
            raise ValueError(
                f"data.resolution {self.data.resolution} with model.family {self.model.family}: its transformer "
                f"takes 2x2 patches of the 8x latents, so it must be a multiple of 16, e.g. {max(16, self.data.resolution // 16 * 16)}"
            )
        if flow and self.loop.snr_gamma is not None:
            raise ValueError(
                f"loop.snr_gamma with model.family {self.model.family}: Min-SNR weights DDPM timesteps; "
                "flow matching weights them by loop.weighting_scheme: unset loop.snr_gamma"
            )
        if flow and self.model.prediction_type is not None:
            raise ValueError(
                f"model.prediction_type with model.family {self.model.family}: it trains on the flow-matching "
                "velocity (noise - latents): unset model.prediction_type"
            )
        if bool(self.model.control_modes) != bool(self.data.control_mode_column):
            given, missing = (
                ("model.control_modes", "data.control_mode_column")
                if self.model.control_modes
                else ("data.control_mode_column", "model.control_modes")
            )
            raise ValueError(f"{given} is set but {missing} is not: a union ControlNet needs both, or neither")
        if self.model.control_modes:
            if self.model.family not in ("auto", "flux"):
                raise ValueError(
                    f"model.control_modes with model.family {self.model.family}: union ControlNets are Flux.1's; "
                    "unset model.control_modes"
                )
            if len(set(self.model.control_modes)) != len(self.model.control_modes):
                raise ValueError("model.control_modes names a condition type twice: give each once")
            unknown = sorted(set(self.validation.control_modes) - set(self.model.control_modes))
            if unknown:
                raise ValueError(
                    f"validation.control_modes has {', '.join(unknown)}, not in model.control_modes: "
                    "use the names of model.control_modes"
                )
            images, modes = len(self.validation.images), len(self.validation.control_modes)
            if images and modes not in (1, images):
                raise ValueError(
                    f"validation.control_modes has {modes} and validation.images has {images}: give one per image, or one for all"
                )
            if images and not modes:
                raise ValueError(
                    "validation.images of a union ControlNet need validation.control_modes: one per image, or one for all"
                )
        elif self.validation.control_modes:
            raise ValueError(
                "validation.control_modes is set without model.control_modes: unset it, or train a union ControlNet"
            )
        if self.data.streaming and self.data.cache:
            raise ValueError(
                "data.cache and data.streaming=true: a cache holds fixed rows; unset one of them "
                "(precompute a non-streamed dataset, or stream without a cache)"
            )
        if self.data.streaming and self.loop.max_steps is None:
            raise ValueError("data.streaming needs loop.max_steps (a stream has no known length): set --max-steps N")
        return self
