"""`cluster`: where and how the trainer runs on Kubernetes (rendered by charts/ctrlnet)."""

from typing import Literal

from pydantic import Field

from ctrlnet.config.section import Section


class Resources(Section):
    cpu: str = "8"
    """CPU request and limit per pod."""
    memory: str = "64Gi"
    """Memory request and limit per pod."""


class SecretsConfig(Section):
    """Secrets are referenced by name and key only; their values never enter a config or manifest."""

    s3: str | None = None
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3:// paths."""
    hub_token: str | None = None
    """Secret with the hub token (key `token`), exposed as train.hub.token_env."""


class ClusterConfig(Section):
    name: str = "ctrlnet"
    """Job name (DNS-1035: lowercase letters, digits, '-'); one name per run."""
    namespace: str = "default"
    """Namespace of the job."""
    backend: Literal["pytorchjob", "trainjob"] = "pytorchjob"
    """PyTorchJob kubeflow.org/v1 (Training Operator v1) or TrainJob trainer.kubeflow.org/v1alpha1."""
    image: str = "ghcr.io/ctrlnet/trainer:0.1.0"
    """Trainer image."""
    nodes: int = Field(default=1, ge=1)
    """Pods (one per node): 1 Master plus nodes-1 Workers."""
    gpus_per_node: int = Field(default=1, ge=0)
    """GPUs per pod, and so torchrun processes per pod."""
    resources: Resources = Field(default_factory=Resources)
    shm_size: str = "16Gi"
    """Size limit of the in-memory /dev/shm volume."""
    queue: str | None = None
    """Kueue LocalQueue name (label kueue.x-k8s.io/queue-name)."""
    secrets: SecretsConfig = Field(default_factory=SecretsConfig)
