"""One typed config, end to end: the CLI validates it, the trainer loads the same class."""

from ctrlnet.config.cluster import ClusterConfig
from ctrlnet.config.job import JobConfig
from ctrlnet.config.loading import load_job_config, load_train_config
from ctrlnet.config.train import TrainConfig

__all__ = ["ClusterConfig", "JobConfig", "TrainConfig", "load_job_config", "load_train_config"]
