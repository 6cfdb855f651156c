"""Upper bounds on every size and count a user types: far above what a serious run uses, low
enough that a slip (`--resolution 100000`, `--rows 1000000000000`) is one error line instead of a
process that allocates the machine's memory or never finishes.

One place, shared by the config model (so `render`, `validate` and `config show` refuse them too)
and the commands whose options are not config keys (`data synth-fill`, `generate`).
"""

MAX_RESOLUTION = 4096
"""Pixels per side of a training or synthetic image (SDXL trains at 1024)."""
MAX_ROWS = 100_000_000
"""Rows of a dataset made or sampled (synthetic rows, max_train_samples); LAION-scale subsets fit."""
MAX_STEPS = 100_000_000
"""Optimizer steps, and any period counted in them (checkpoint, validation, logging, warmup)."""
MAX_EPOCHS = 1_000_000
MAX_BATCH_SIZE = 65_536
"""Examples per process per micro-batch, and micro-batches per optimizer step."""
MAX_WORKERS = 256
"""Data-loading worker processes per rank."""
MAX_SHUFFLE_BUFFER = 10_000_000
MAX_IMAGES = 256
"""Images generated per (prompt, image) pair, and validation prompts or images given."""
MAX_INFERENCE_STEPS = 1000
"""Denoising steps per generated image (the schedulers' own training timesteps)."""
MAX_ADHERENCE_ROWS = 100_000
MAX_LAYERS = 1000
"""Transformer blocks of a ControlNet (Flux.1-dev's base has 19 double and 38 single ones)."""
MAX_TEXT_TOKENS = 512
"""T5 tokens of a prompt (SD3's and Flux.1's pipelines accept at most 512)."""
MAX_CONTROL_MODES = 64
"""Condition types of one union ControlNet (InstantX's Flux union has 7)."""
MAX_TEXT = 4096
"""Characters of any text value (a name, a path, a prompt)."""
MAX_NODES = 10_000
"""Pods (nodes) of one cluster job."""
MAX_GPUS_PER_NODE = 64
MAX_COUNT = 10_000
"""Any other count (checkpoints kept, restarts, upload tries, scheduler cycles)."""
MAX_SECONDS = 365 * 24 * 3600
"""Any duration in seconds (a timeout, a backoff, a deadline): a year."""
MAX_ID = 2**31 - 1
"""A Linux user or group id (Kubernetes' own bound on runAsUser and runAsGroup)."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""A seed: any 64-bit integer."""
