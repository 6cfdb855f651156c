"""`JobConfig` = `train` (read by the trainer) + `cluster` (read by the chart)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from ctrlnet.config.cluster import ClusterConfig
from ctrlnet.config.section import Section
from ctrlnet.config.train import TrainConfig


class JobConfig(Section):
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    _source: dict[str, Any] | None = PrivateAttr(default=None)
    """What the file and overrides said, before validation: `with_overrides` applies more to it,
    so `from_file(f).with_overrides(a).with_overrides(b)` is `ctrlnet submit -f f --set a --set b`."""

    def __eq__(self, other: object) -> bool:
        """Equal values are equal configs, however they were made (`_source` is not compared)."""
        if not isinstance(other, JobConfig):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    # ------------------------------------------------------------ the Python API's constructors
    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> JobConfig:
        """The job file at `path` (plus `a.b=c` overrides), validated as `ctrlnet submit -f path`
        does (for a cluster); one `UserError` line on any problem, the CLI's."""
        from ctrlnet.config.loading import read_yaml

        return cls._from_data(read_yaml(path), overrides)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> JobConfig:
        """A new config: this one with `a.b=c` overrides applied (as `--set a.b=c`), validated again."""
        if isinstance(overrides, str):
            overrides = [overrides]
        source = self._source if self._source is not None else self.model_dump(mode="json", exclude_unset=True)
        return type(self)._from_data(copy.deepcopy(source), list(overrides))

    @classmethod
    def _from_data(cls, data: dict[str, Any], overrides: list[str] | None) -> JobConfig:
        from ctrlnet.config.loading import apply_override, validate

        for assignment in overrides or []:
            apply_override(data, assignment, cls)
        cfg = validate(cls, copy.deepcopy(data), {"target": "cluster"})
        cfg._source = data
        return cfg

    @model_validator(mode="after")
    def _devices_fit_the_pods(self, info: ValidationInfo) -> JobConfig:
        # Only for a job bound for a cluster (render, validate, submit: context target=cluster):
        # a local `ctrlnet train` ignores the cluster section, so trying a cluster job file on a
        # laptop with loop.device=cpu must not trip over its gpus_per_node.
        if (info.context or {}).get("target") != "cluster":
            return self
        gpus, device = self.cluster.gpus_per_node, self.train.loop.device
        if gpus == 0 and device == "cuda":
            raise ValueError(
                "train.loop.device is cuda but cluster.gpus_per_node is 0, so the pods get no GPU: "
                "set cluster.gpus_per_node to the GPUs per pod, or train.loop.device to cpu or auto"
            )
        if gpus > 0 and device == "cpu":
            raise ValueError(
                f"cluster.gpus_per_node is {gpus} but train.loop.device is cpu: the pods would hold "
                f"{gpus} GPU(s) each and train on the CPU; set cluster.gpus_per_node: 0 for a CPU job, "
                "or train.loop.device to auto or cuda"
            )
        return self

    @model_validator(mode="after")
    def _precompute_writes_a_cache(self) -> JobConfig:
        # Any target (the chart refuses it too): pods that would encode everything and write it nowhere.
        if self.cluster.task == "precompute" and not self.train.data.cache:
            raise ValueError(
                "cluster.task is precompute but train.data.cache is not set: give the folder or URL the job "
                "writes the cache to (object storage, or a path on the cache volume), e.g. "
                "--set train.data.cache=s3://bucket/caches/fill50k-sd15-512"
            )
        return self

    @model_validator(mode="after")
    def _prepare_reads_a_source_and_writes_a_dataset(self) -> JobConfig:
        # Any target (the chart refuses it too): pods with nothing to annotate, or nowhere to write it.
        if self.cluster.task != "prepare":
            return self
        if not self.train.prepare.source:
            raise ValueError(
                "cluster.task is prepare but train.prepare.source is not set: give the images (+ captions) "
                "the job annotates (a hub dataset, an imagefolder or parquet folder, or a URL), e.g. "
                "--set train.prepare.source=s3://bucket/raw/photos"
            )
        if not self.train.data.dataset:
            raise ValueError(
                "cluster.task is prepare but train.data.dataset is not set: give the folder or URL the job "
                "writes the dataset to (object storage, or a path on the cache volume), e.g. "
                "--set train.data.dataset=s3://bucket/datasets/photos-canny-512"
            )
        return self
