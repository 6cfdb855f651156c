"""Facts that the chart, `ctrlnet validate` and the trainer image share, each written once here.

The chart cannot import Python, so `python tools/generate.py` writes these values into
charts/ctrlnet/templates/_generated.tpl as named templates (tests/test_generated.py keeps that
file in sync); ctrlnet.k8s.rules checks rendered pods against the same constants, and
tests/k8s/test_docker.py checks docker/Dockerfile's entrypoint against them.
"""

from ctrlnet.config.train import HubConfig, TrainConfig

CONFIG_DIR = "/etc/ctrlnet"
"""Where the job's ConfigMap is mounted in the trainer container."""
CONFIG_FILE = "config.yaml"
"""The ConfigMap key that holds the `train` section, and so the file name under CONFIG_DIR."""
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
"""What the trainer reads in a pod (`--config`)."""

LAUNCH_MODULE = "ctrlnet_trainer.launch"
"""The pod's entrypoint, `python -m LAUNCH_MODULE`: torchrun with exit codes Kubeflow can act on."""
TRAINER_MODULE = "ctrlnet_trainer"
"""What the launcher starts in every process: `-m TRAINER_MODULE --config CONFIG_PATH`."""
PRECOMPUTE_MODULE = "ctrlnet_trainer.precompute"
"""The latent/text-embedding cache job (`ctrlnet precompute`): the same command line as
TRAINER_MODULE, started by the same launcher; each process encodes its own shards."""

PREPARE_MODULE = "ctrlnet_trainer.prepare"
"""The dataset preparation job (`ctrlnet prepare`): annotates `train.prepare.source` into
`train.data.dataset`; the same command line as TRAINER_MODULE, started by the same launcher; each
process annotates its own shards."""

TRAINER_UID = 10001
"""UID and GID of the trainer image's `ctrlnet` user (docker/Dockerfile) and the chart's default
runAsUser / runAsGroup / fsGroup: at least 10000, so it collides with no user of the node."""
HOME_DIR = "/home/ctrlnet"
"""HOME and WORKDIR of the trainer image; the chart mounts the pod's scratch volume there (the root
filesystem is read-only), so every cache under HOME (hub, torch, triton, matplotlib) is writable."""
TMP_DIR = "/tmp"
"""The pod's other writable path (scratch volume): torchrun's logs, the staging of object-storage
outputs (CTRLNET_WORK_DIR defaults to it), torch's compile caches."""
SECRETS_DIR = "/var/run/secrets/ctrlnet"
"""Where `cluster.secrets.as_files` mounts the referenced Secrets, one folder each (s3/, hub/)."""

DEFAULT_HUB_TOKEN_ENV: str = HubConfig.model_fields["token_env"].default
"""The variable that carries the hub token when the job leaves `train.hub.token_env` unset."""
DEFAULT_OUTPUT: str = TrainConfig.model_fields["output"].default
"""The run's output when the job leaves `train.output` unset."""

# The layout of a run's output prefix, written by the trainer and read by `ctrlnet status` /
# `ctrlnet submit` (docs: README "What a run writes").
RUN_FILE = "run.json"
"""Seed and config of the run that owns the prefix: written once the run has checked its inputs
(models, data, checkpoint) and is about to train; from then on the output is taken."""
FINISHED = "FINISHED"
"""Written last by a run that completed (its final step, controlnet/, metrics): such an output is
never trained into again."""
CHECKPOINTS_DIR = "checkpoints"
COMMITTED = "COMMITTED"
"""Written last into a checkpoint folder: a checkpoint without it does not exist."""
LATEST = "latest"
"""checkpoints/latest: the name of the newest committed checkpoint folder. Also the value of
`train.checkpoint.resume` that resumes from it, which the chart's ConfigMap sets when the job
leaves it unset (a restarted pod continues its own run)."""
TRAINER_STATE = "trainer_state.json"
"""The loop's position in a checkpoint: step, total_steps, data position, seed, run shape."""
METRICS_FILE = "metrics.jsonl"
FINAL_MODEL_DIR = "controlnet"
"""The final ControlNet (diffusers format); checkpoints hold the same folder name."""

# A precomputed cache (`train.data.cache`, written by `ctrlnet precompute`; format: ctrlnet_trainer.cache.layout).
CACHE_MANIFEST = "cache.json"
"""Written last by a precompute, once every shard exists: rows, shards, fingerprint. A cache
without it does not exist; `ctrlnet precompute --nproc` reports from it."""
PREPARE_MANIFEST = "prepared.json"
"""Written last by `ctrlnet prepare` at the top of `train.data.dataset`, once every shard exists
(ctrlnet_trainer.prepare.layout): rows, skipped rows, the annotator and its parameters."""
