"""diffusers' `examples/controlnet/train_controlnet.py`, `train_controlnet_sdxl.py`,
`train_controlnet_sd3.py` and `train_controlnet_flux.py` flags -> ctrlnet config keys.

The SDXL script takes every flag of the SD script plus five of its own (SDXL_FLAGS); the SD3 and
Flux.1 scripts take most of them plus their own (SD3_FLAGS, FLUX_FLAGS), and give a few shared
flags another default or meaning (SD3_NOTES, FLUX_NOTES). ctrlnet trains every family with one
config, the family read from the base (`train.model.family: auto`).

Pure data (no imports): docs/config.md is generated from it, the loader uses it to point a user
who types a reference flag name as a key to the right key, and tests check every key is real.
Flags are argparse dest names (`--train_batch_size` is `train_batch_size`).
"""

# Every one of the reference script's 52 flags -> the key under `train.` that does the same thing.
DIFFUSERS_FLAGS: dict[str, str] = {
    # model
    "pretrained_model_name_or_path": "train.model.base",
    "controlnet_model_name_or_path": "train.model.controlnet",
    "revision": "train.model.revision",
    "variant": "train.model.variant",
    "tokenizer_name": "train.model.tokenizer",
    "cache_dir": "train.model.cache_dir",
    # run prefix
    "output_dir": "train.output",
    # loop
    "seed": "train.loop.seed",
    "train_batch_size": "train.loop.batch_size",
    "num_train_epochs": "train.loop.num_epochs",
    "max_train_steps": "train.loop.max_steps",
    "gradient_accumulation_steps": "train.loop.gradient_accumulation_steps",
    "gradient_checkpointing": "train.loop.gradient_checkpointing",
    "allow_tf32": "train.loop.allow_tf32",
    "mixed_precision": "train.loop.mixed_precision",
    "enable_xformers_memory_efficient_attention": "train.loop.attention",
    # checkpoints
    "checkpointing_steps": "train.checkpoint.every_steps",
    "checkpoints_total_limit": "train.checkpoint.total_limit",
    "resume_from_checkpoint": "train.checkpoint.resume",
    # optimizer and schedule
    "learning_rate": "train.optim.learning_rate",
    "scale_lr": "train.optim.scale_lr",
    "lr_scheduler": "train.optim.lr_scheduler",
    "lr_warmup_steps": "train.optim.lr_warmup_steps",
    "lr_num_cycles": "train.optim.lr_num_cycles",
    "lr_power": "train.optim.lr_power",
    "use_8bit_adam": "train.optim.optimizer",
    "adam_beta1": "train.optim.adam_beta1",
    "adam_beta2": "train.optim.adam_beta2",
    "adam_weight_decay": "train.optim.weight_decay",
    "adam_epsilon": "train.optim.adam_epsilon",
    "max_grad_norm": "train.optim.max_grad_norm",
    "set_grads_to_none": "train.optim.set_grads_to_none",
    # data
    "dataset_name": "train.data.dataset",
    "dataset_config_name": "train.data.config_name",
    "train_data_dir": "train.data.dataset",
    "image_column": "train.data.image_column",
    "conditioning_image_column": "train.data.conditioning_image_column",
    "caption_column": "train.data.caption_column",
    "max_train_samples": "train.data.max_train_samples",
    "proportion_empty_prompts": "train.data.proportion_empty_prompts",
    "resolution": "train.data.resolution",
    "dataloader_num_workers": "train.data.num_workers",
    # validation
    "validation_prompt": "train.validation.prompts",
    "validation_image": "train.validation.images",
    "num_validation_images": "train.validation.num_images",
    "validation_steps": "train.validation.every_steps",
    # logging
    "report_to": "train.logging.report_to",
    "logging_dir": "train.logging.logging_dir",
    "tracker_project_name": "train.logging.tracker_project_name",
    # hub
    "push_to_hub": "train.hub.push",
    "hub_token": "train.hub.token_env",
    "hub_model_id": "train.hub.model_id",
}

# The five flags train_controlnet_sdxl.py adds to the 52 above -> the key under `train.`.
SDXL_FLAGS: dict[str, str] = {
    "pretrained_vae_model_name_or_path": "train.model.vae",
    "crops_coords_top_left_h": "train.data.crops_coords_top_left",
    "crops_coords_top_left_w": "train.data.crops_coords_top_left",
    "image_interpolation_mode": "train.data.interpolation",
    "enable_npu_flash_attention": "train.loop.attention",
}

# The nine flags train_controlnet_sd3.py has that neither table above has -> the key under `train.`.
# (It lacks tokenizer_name, the xformers switch and the five SDXL flags.)
SD3_FLAGS: dict[str, str] = {
    "upcast_vae": "train.model.upcast_vae",
    "max_sequence_length": "train.model.max_sequence_length",
    "num_extra_conditioning_channels": "train.model.controlnet",
    "weighting_scheme": "train.loop.weighting_scheme",
    "logit_mean": "train.loop.logit_mean",
    "logit_std": "train.loop.logit_std",
    "mode_scale": "train.loop.mode_scale",
    "precondition_outputs": "train.loop.precondition_outputs",
    "dataset_preprocess_batch_size": "train.data.cache",
}

# The eleven flags train_controlnet_flux.py has that neither the SD nor the SDXL table has -> the key
# under `train.`. (It also takes the SDXL flags but --pretrained_vae_model_name_or_path and
# --crops_coords_top_left_h/_w are never read; it lacks --train_data_dir.)
FLUX_FLAGS: dict[str, str] = {
    "num_double_layers": "train.model.controlnet_layers",
    "num_single_layers": "train.model.controlnet_single_layers",
    "guidance_scale": "train.model.guidance_scale",
    "jsonl_for_train": "train.data.dataset",
    "use_adafactor": "train.optim.optimizer",
    "save_weight_dtype": "train.checkpoint.final_dtype",
    "weighting_scheme": "train.loop.weighting_scheme",
    "logit_mean": "train.loop.logit_mean",
    "logit_std": "train.loop.logit_std",
    "mode_scale": "train.loop.mode_scale",
    "enable_model_cpu_offload": "train.distributed.offload_optimizer",
}

# Flags that have no equivalent here: each maps to the nearest key, and its note says why and what
# ctrlnet does instead (the loader's hint says so rather than calling the key the flag's).
NEAREST: frozenset[str] = frozenset(
    {"num_extra_conditioning_channels", "dataset_preprocess_batch_size", "enable_model_cpu_offload"}
)

# The value a switch-like flag stands for, where it is not simply `true` on a bool key (for
# --enable_npu_flash_attention, the nearest ctrlnet has: see its note).
FLAG_VALUES: dict[str, str] = {
    "use_8bit_adam": "adamw_8bit",
    "enable_xformers_memory_efficient_attention": "xformers",
    "enable_npu_flash_attention": "sdpa",
    "use_adafactor": "adafactor",
}

# Flags whose mapping needs a word.
NOTES: dict[str, str] = {
    "output_dir": "May be an fsspec URL (`s3://…`, `gs://…`): checkpoints and the model go straight to object storage.",
    "mixed_precision": "Default `no` instead of the machine's accelerate config; the ControlNet keeps fp32 master weights.",
    "enable_xformers_memory_efficient_attention": "A value of `train.loop.attention`, not a switch; the default `sdpa` is PyTorch's fused attention.",
    "use_8bit_adam": "A value of `train.optim.optimizer`, not a switch (bitsandbytes' 8-bit AdamW).",
    "checkpointing_steps": "A checkpoint exists only once its `COMMITTED` marker is written; `latest` moves after that.",
    "checkpoints_total_limit": "Old checkpoints are removed only after a newer one is committed, never before saving.",
    "resume_from_checkpoint": "`latest` = newest committed checkpoint; resumes at the exact batch instead of replaying the epoch.",
    "max_grad_norm": "`null` turns clipping off.",
    "dataset_name": "One key for both `--dataset_name` and `--train_data_dir`.",
    "train_data_dir": "Same key as `--dataset_name`: point `train.data.dataset` at the folder.",
    "validation_prompt": 'A YAML list; `--set train.validation.prompts="a prompt"` makes a one-item list.',
    "validation_image": "A YAML list, paired with the prompts as the reference pairs them.",
    "report_to": "`tensorboard`, `wandb` or `none` (no `comet_ml`, no `all`); metrics.jsonl is always written.",
    "hub_token": "Takes the name of an environment variable, never the token; on Kubernetes it comes from `cluster.secrets.hub_token`.",
    # where train_controlnet_sdxl.py differs on a flag both scripts have
    "tokenizer_name": "For SDXL it replaces the first tokenizer; train_controlnet_sdxl.py accepts the flag but "
    "ignores it.",
    "tracker_project_name": "train_controlnet_sdxl.py defaults to `sd_xl_train_controlnet`; ctrlnet keeps "
    "`train_controlnet` for both families.",
    # train_controlnet_sdxl.py's own flags
    "pretrained_vae_model_name_or_path": "E.g. `madebyollin/sdxl-vae-fp16-fix`.",
    "crops_coords_top_left_h": "One `[top, left]` pair for both flags (this one is `top`); unset = each image's own "
    "crop offset and original size per sample, as SDXL was trained; the reference passes a constant (`0, 0` by "
    "default).",
    "crops_coords_top_left_w": "The `left` of the same `[top, left]` pair.",
    "image_interpolation_mode": "`auto` follows each reference script: bilinear for SD, lanczos (the SDXL script's "
    "default) for SDXL. torchvision's `nearest_exact`, `box` and `hamming` are not offered.",
    "enable_npu_flash_attention": "ctrlnet targets CUDA and CPU: no Ascend NPU support. `sdpa` (the default), "
    "PyTorch's fused attention, is the fused-attention choice.",
    # train_controlnet_sd3.py's and train_controlnet_flux.py's own flags
    "upcast_vae": "Needs `train.loop.mixed_precision` fp16 or bf16 to change anything.",
    "max_sequence_length": "train_controlnet_sd3.py defaults to 77, while StableDiffusion3ControlNetPipeline "
    "encodes 256 T5 tokens: the ControlNet trained on 77 is sampled on embeddings it never saw. Unset here = "
    "the family pipeline's own (SD3 256, Flux.1 512), the same in training and validation.",
    "num_extra_conditioning_channels": "No key of its own: the stock StableDiffusion3ControlNetPipeline feeds the "
    "ControlNet the 16 latent channels of the conditioning image only, so a ControlNet with extra conditioning "
    "channels cannot be sampled by it (nor validated). To train one (e.g. an inpainting ControlNet), start from it "
    "with `train.model.controlnet`: its own config keeps its channels.",
    "weighting_scheme": "Same choices and default (`logit_normal`) as the scripts; `none` (uniform, "
    "unweighted) is train_controlnet_flux.py's extra choice, offered for SD3 too.",
    "precondition_outputs": "train_controlnet_sd3.py's default 1 is an int; here a bool, and unset = on for SD3 "
    "(the SD3 script's default), off for Flux.1 (train_controlnet_flux.py has no such flag and never "
    "preconditions).",
    "dataset_preprocess_batch_size": "No key of its own: train_controlnet_sd3.py encodes every prompt of the "
    "dataset before training (`datasets.map`, 1000 rows per batch) and keeps the embeddings in memory; "
    "ctrlnet's counterpart is `ctrlnet precompute` into `train.data.cache` (prompts, pooled text and both VAE "
    "posteriors once, written in shards of `--shard-rows` rows), or encoding each batch's prompts with that "
    "batch when no cache is set. The encoders' own batch is fixed (16 rows), so there is nothing to size.",
    "num_double_layers": "Same default (4) for Flux.1; for SD3 the same key sets the joint blocks.",
    "num_single_layers": "Same default (4).",
    "guidance_scale": "Same default (3.5). Only a base with a guidance embedding (Flux.1-dev) takes it, as in "
    "the script; also the validation pipeline's guidance.",
    "jsonl_for_train": "One key for `--dataset_name` and `--jsonl_for_train`: point `train.data.dataset` at "
    "the .jsonl (or .json) file. Image paths in it are resolved against the file's folder (absolute paths and "
    "URLs as they are); the script opens them relative to the working directory.",
    "use_adafactor": "A value of `train.optim.optimizer`, not a switch: transformers' Adafactor built as the "
    "script builds it (`learning_rate` as given, `weight_decay`, no relative step or parameter scaling).",
    "save_weight_dtype": "Only the final `controlnet/` is written in it, as a plain "
    "`diffusion_pytorch_model.safetensors` (the script names fp16/bf16 files as a variant, "
    "`diffusion_pytorch_model.fp16.safetensors`); checkpoints keep the fp32 master weights.",
    "enable_model_cpu_offload": "No key of its own: the script puts its pipeline's models (text encoders, VAE, "
    "transformer, ControlNet) under accelerate's CPU-offload hooks, but ctrlnet's validation samples with the "
    "very models being trained, on the training device, and offloading them would move the ControlNet under "
    "training off it. The nearest memory saver that moves something to the CPU is DeepSpeed's optimizer-state "
    "offload (this key, with `train.distributed.strategy: deepspeed`); `train.loop.mixed_precision` (frozen "
    "models in fp16/bf16), `train.loop.gradient_checkpointing` and `train.optim.optimizer: adafactor` save GPU "
    "memory too.",
}

# Where train_controlnet_sd3.py gives a flag it shares with the tables above another default or
# meaning (shown with that script's section of docs/config.md).
SD3_NOTES: dict[str, str] = {
    "conditioning_image_column": "train_controlnet_sd3.py VAE-encodes the conditioning image from [0, 1] (it "
    "never normalises it), while StableDiffusion3ControlNetPipeline encodes it from [-1, 1]: a ControlNet "
    "trained by the script is sampled on latents it never saw. ctrlnet feeds each family's ControlNet exactly "
    "what its pipeline feeds it.",
    "tokenizer_name": "train_controlnet_sd3.py has no such flag (its three tokenizers come from the base).",
    "enable_xformers_memory_efficient_attention": "train_controlnet_sd3.py has no such flag.",
}

# Where train_controlnet_flux.py gives a flag it shares with the tables above another default or meaning.
FLUX_NOTES: dict[str, str] = {
    "conditioning_image_column": "train_controlnet_flux.py normalises the conditioning image to [-1, 1] "
    "before VAE-encoding it, as FluxControlNetPipeline does (train_controlnet_sd3.py does not); ctrlnet feeds "
    "each family's ControlNet exactly what its pipeline feeds it.",
    "tracker_project_name": "train_controlnet_flux.py defaults to `flux_train_controlnet`; ctrlnet keeps "
    "`train_controlnet` for every family.",
    "num_validation_images": "train_controlnet_flux.py defaults to 2; ctrlnet keeps 4 for every family.",
    "pretrained_vae_model_name_or_path": "train_controlnet_flux.py accepts it but never reads it.",
    "crops_coords_top_left_h": "train_controlnet_flux.py accepts it but never reads it (an SDXL UNet input: "
    "Flux.1 has none).",
    "crops_coords_top_left_w": "As `--crops_coords_top_left_h`: accepted, never read.",
    "image_interpolation_mode": "train_controlnet_flux.py defaults to lanczos, for the image and the "
    "conditioning image alike: `train.data.interpolation: lanczos` resizes the same way.",
    "weighting_scheme": "train_controlnet_flux.py samples the timesteps by it but never weights the loss, so "
    "its `cosmap` and `sigma_sqrt` train like `none`; ctrlnet weights the loss by them as "
    "train_controlnet_sd3.py does, for both families.",
    "train_data_dir": "train_controlnet_flux.py has no such flag (it reads a hub dataset or `--jsonl_for_train`).",
}

# Keys ctrlnet adds that the reference lacks, or where it does what the reference gets wrong.
EXTRAS: dict[str, str] = {
    "train.model.family": "SD 1.x/2.x, SDXL, SD3/SD3.5 and Flux.1 in one trainer (the reference needs a script "
    "per family).",
    "train.model.control_modes": "Flux.1 union ControlNets (one ControlNet, several condition types, each row "
    "tagged with its type): train_controlnet_flux.py trains a plain ControlNet only.",
    "train.data.control_mode_column": "The column naming each row's condition type, for a union ControlNet.",
    "train.validation.control_modes": "The condition type of each validation image, for a union ControlNet.",
    "train.model.prediction_type": "Override the training target (epsilon / v_prediction); the reference always uses the scheduler's.",
    "train.data.split": "Which split to train on; the reference hard-codes `train`.",
    "train.data.streaming": "Streaming datasets, which the guide promises and the PyTorch script lacks.",
    "train.data.shuffle_buffer": "Shuffle buffer size for streaming.",
    "train.data.synthetic_rows": "A synthetic fill50k look-alike when no dataset is given (demos, tests).",
    "train.loop.snr_gamma": "Min-SNR-gamma loss weighting, which the guide promises and the script lacks.",
    "train.loop.device": "Train on CPU or CUDA explicitly.",
    "train.distributed": "DDP or DeepSpeed ZeRO configured in code, not by a hand-written accelerate config.",
    "train.distributed.zero_stage": "DeepSpeed ZeRO stage 1, 2 or 3, with or without optimizer offload: each trains, checkpoints and resumes exactly (the reference's save hangs under DeepSpeed); ZeRO-3 gathers the weights for checkpoints, the final model and validation.",
    "train.distributed.offload_optimizer": "DeepSpeed optimizer-state offload to CPU.",
    "train.checkpoint": "Checkpoints are atomic (`COMMITTED` marker, `latest` pointer), may live in object storage, and resume at the exact batch.",
    "train.validation.num_inference_steps": "Denoising steps per validation image (the reference hard-codes 20).",
    "train.logging.every_steps": "How often a metrics line goes to metrics.jsonl and the tracker.",
    "train.hub.private": "Create the hub repo as private.",
    "cluster": "Where and how the job runs on Kubernetes: the reference leaves this to you.",
}
