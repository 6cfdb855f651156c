"""`JobConfig` = `train` (read by the trainer) + `cluster` (read by the chart)."""

from pydantic import Field

from ctrlnet.config.cluster import ClusterConfig
from ctrlnet.config.section import Section
from ctrlnet.config.train import TrainConfig


class JobConfig(Section):
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
