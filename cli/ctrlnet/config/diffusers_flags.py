"""diffusers' `examples/controlnet/train_controlnet.py` and `train_controlnet_sdxl.py` flags ->
ctrlnet config keys.

The SDXL script takes every flag of the SD script plus five of its own (SDXL_FLAGS); ctrlnet trains
both families with one config, the family read from the base (`train.model.family: auto`).

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

# The value a switch-like flag stands for, where it is not simply `true` on a bool key (for
# --enable_npu_flash_attention, the nearest ctrlnet has: see its note).
FLAG_VALUES: dict[str, str] = {
    "use_8bit_adam": "adamw_8bit",
    "enable_xformers_memory_efficient_attention": "xformers",
    "enable_npu_flash_attention": "sdpa",
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
}

# Keys ctrlnet adds that the reference lacks, or where it does what the reference gets wrong.
EXTRAS: dict[str, str] = {
    "train.model.family": "SD 1.x/2.x and SDXL in one trainer (the reference needs a second script for SDXL).",
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
