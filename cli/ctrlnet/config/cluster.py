"""`cluster`: where and how the trainer runs on Kubernetes. Read by charts/ctrlnet, never by the trainer.

The chart's values are the JobConfig shape (`train:` + `cluster:`), so every key here is a chart
value of the same name; charts/ctrlnet/values.schema.json is generated from these classes.
Rule kept for Helm's sake: a key that may be null defaults to null (Helm drops a null that
overrides a non-null chart default, so "null to switch off" would silently not work).
"""

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ctrlnet.config.bounds import MAX_COUNT, MAX_GPUS_PER_NODE, MAX_ID, MAX_NODES, MAX_SECONDS
from ctrlnet.config.contract import TRAINER_UID
from ctrlnet.config.credentials import credential_kind, refuse_credentials, secret_env_name
from ctrlnet.config.k8s_syntax import (
    QUANTITY,
    cpu_problem,
    label_value_problem,
    qualified_name_problem,
    quantity_problem,
    secret_name_problem,
)
from ctrlnet.config.section import Section

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
"""RFC 1035 label: what Kubeflow's webhooks require of a job name."""
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
IMAGE_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
"""An image reference pinned by digest ends so; anything else is a tag the registry can move."""
MAX_NAME = 50
"""Longest job name: pods and their Services are `<name>-worker-<index>`, at most 63 characters."""

# Variables the launcher and the Training Operator / Trainer set; a user value would break rendezvous.
RESERVED_ENV = frozenset(
    {
        "PET_NNODES",
        "PET_NPROC_PER_NODE",
        "PET_NODE_RANK",
        "PET_MASTER_ADDR",
        "PET_MASTER_PORT",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
    }
)
looks_secret = secret_env_name
"""True for variable names that hold credentials (ctrlnet.config.credentials): those must come
from a Secret (secretKeyRef)."""
# Quantities also go into values.schema.json, so plain `helm install` refuses `64GB` too.
_QUANTITY_SCHEMA = {"pattern": QUANTITY.pattern}


def _secret_name(v: str) -> str:
    """A Secret's name; a credential pasted in its place is refused without being quoted."""
    kind = credential_kind(v, blobs=True)
    if kind:
        raise ValueError(
            f"looks like {kind} (not shown): give the name of a Kubernetes Secret that holds it "
            "(kubectl create secret generic NAME --from-literal=KEY=...), never the credential"
        )
    problem = secret_name_problem(v)
    if problem:
        raise ValueError(problem)
    return v


def _env_var_name(v: str) -> str:
    kind = credential_kind(v, blobs=True)
    if kind:
        raise ValueError(f"looks like {kind} (not shown): give an environment variable name, e.g. WANDB_API_KEY")
    if not ENV_NAME.match(v):
        raise ValueError("must be an environment variable name (letters, digits and '_'), e.g. WANDB_API_KEY")
    return v


def _check_keys(v: dict[str, str], what: str) -> dict[str, str]:
    for key in v:
        if problem := qualified_name_problem(key, what):
            raise ValueError(problem)
    return v


def _quantity(example: str):
    def check(v: str | None) -> str | None:
        problem = quantity_problem(v, example) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v

    return check


class Resources(Section):
    """Per-pod compute. Requests equal limits (Guaranteed QoS), so a training pod is never the
    first to be evicted for memory pressure."""

    cpu: str = Field(default="8", json_schema_extra=_QUANTITY_SCHEMA)
    """CPU request and limit per pod (a Kubernetes quantity: `8`, `7500m`)."""
    memory: str = Field(default="64Gi", json_schema_extra=_QUANTITY_SCHEMA)
    """Memory request and limit per pod (a Kubernetes quantity: `64Gi`)."""
    ephemeral_storage: str | None = Field(default=None, json_schema_extra=_QUANTITY_SCHEMA)
    """Local disk request and limit per pod (e.g. `100Gi`); unset: none requested."""

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        if problem := cpu_problem(v):
            raise ValueError(problem)
        return v

    _memory = field_validator("memory")(_quantity("64Gi"))
    _disk = field_validator("ephemeral_storage")(_quantity("100Gi"))


class SecretEnv(Section):
    """One environment variable read from a Secret key (`valueFrom.secretKeyRef`)."""

    name: str
    """Environment variable name."""
    secret: str
    """Name of the Secret (in the job's namespace)."""
    key: str
    """Key inside the Secret."""
    optional: bool = False
    """Start the pod even when the Secret or key is missing."""

    _name = field_validator("name")(_env_var_name)
    _secret = field_validator("secret")(_secret_name)


class SecretsConfig(Section):
    """Secrets are referenced by name and key only (`secretKeyRef`); their values never enter a
    config or a manifest."""

    s3: str | None = None
    """Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally
    AWS_ENDPOINT_URL, AWS_REGION) for s3:// paths; each becomes the env var of the same name.
    With `as_files`: a Secret with key `config`, an AWS config file (see `as_files`)."""
    hub_token: str | None = None
    """Secret holding the hub token, exposed as the env var named by `train.hub.token_env`
    (with `as_files`: as the file HF_TOKEN_PATH names)."""
    hub_token_key: str = "token"
    """Key of the hub token inside the `hub_token` Secret."""
    env: list[SecretEnv] = Field(default_factory=list)
    """More env vars from Secret keys, e.g. `{name: WANDB_API_KEY, secret: wandb, key: api-key}`."""
    as_files: bool = False
    """Mount the `s3` and `hub_token` Secrets as read-only files under /var/run/secrets/ctrlnet
    instead of environment variables (which every child process inherits and a crash dump or a
    debug print of the environment shows). The trainer reads them through the libraries' own
    variables: AWS_CONFIG_FILE names `s3`'s key `config`, an AWS config file (`[default]` with
    aws_access_key_id, aws_secret_access_key and optionally region, endpoint_url); HF_TOKEN_PATH
    names the hub token. `env` entries stay variables (their libraries read only the environment)."""

    _names = field_validator("s3", "hub_token")(lambda v: v if v is None else _secret_name(v))


class ServiceAccountConfig(Section):
    create: bool = True
    """Create a ServiceAccount for the job's pods (with no API permissions)."""
    name: str | None = None
    """ServiceAccount name; unset: the job name. Set it with `create: false` to use an existing one."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations of the created ServiceAccount, e.g. `eks.amazonaws.com/role-arn` (IRSA) or
    `iam.gke.io/gcp-service-account` (Workload Identity) for keyless object-storage access."""

    @field_validator("annotations")
    @classmethod
    def _annotation_keys(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_keys(v, "annotation key")


class CacheConfig(Section):
    """A shared PersistentVolumeClaim mounted in every pod: hub downloads and datasets are fetched
    once, not once per node and restart. `HF_HOME` points into it."""

    enabled: bool = False
    """Mount a shared cache volume."""
    existing_claim: str | None = None
    """Use this existing PVC instead of creating one."""
    size: str = Field(default="200Gi", json_schema_extra=_QUANTITY_SCHEMA)
    """Size of the created PVC."""
    storage_class: str | None = None
    """StorageClass of the created PVC; unset: the cluster default."""
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"] = "ReadWriteMany"
    """Access mode of the created PVC; several nodes need ReadWriteMany."""
    mount_path: str = "/cache"
    """Where the cache is mounted in the container."""

    _size = field_validator("size")(_quantity("200Gi"))


class KueueConfig(Section):
    """Kueue admission (https://kueue.sigs.k8s.io). A queued job is created suspended; Kueue
    unsuspends it when the ClusterQueue admits it."""

    queue: str | None = None
    """LocalQueue name (label `kueue.x-k8s.io/queue-name`); unset: no Kueue."""
    priority_class: str | None = None
    """WorkloadPriorityClass name (label `kueue.x-k8s.io/priority-class`)."""

    @field_validator("queue", "priority_class")
    @classmethod
    def _label_value(cls, v: str | None) -> str | None:
        # Both become label values on the job: the API server would refuse anything else.
        if v is not None and (problem := label_value_problem(v)):
            raise ValueError(problem)
        return v


class VolcanoConfig(Section):
    """Volcano gang scheduling (https://volcano.sh): all pods start together or none do."""

    queue: str | None = None
    """Volcano Queue name; unset: no Volcano. PyTorchJob: `runPolicy.schedulingPolicy.queue` and
    `schedulerName: volcano` (the Training Operator must run with `--gang-scheduler-name=volcano`);
    TrainJob: annotation `scheduling.volcano.sh/queue-name` (the runtime needs `podGroupPolicy.volcano`)."""
    min_available: int | None = Field(default=None, ge=1, le=MAX_NODES)
    """Pods that must be schedulable together; unset: all `nodes`."""
    priority_class: str | None = None
    """PriorityClass of the PodGroup (`schedulingPolicy.priorityClass`)."""
    schedule_timeout_seconds: int | None = Field(default=None, ge=1, le=MAX_SECONDS)
    """Give up gang scheduling after this long (`schedulingPolicy.scheduleTimeoutSeconds`; at most a year)."""


class SecurityConfig(Section):
    """The pod always runs as non-root, without privilege escalation, all capabilities dropped and
    the RuntimeDefault seccomp profile; these are the ids it runs as."""

    run_as_user: int = Field(default=TRAINER_UID, ge=1, le=MAX_ID)
    """UID of the trainer process (the image's `ctrlnet` user, 10001: at least 10000, so it
    collides with no user of the node)."""
    run_as_group: int = Field(default=TRAINER_UID, ge=0, le=MAX_ID)
    """GID of the trainer process."""
    fs_group: int = Field(default=TRAINER_UID, ge=0, le=MAX_ID)
    """Group that owns mounted volumes (scratch, cache PVC)."""


class NetworkPolicyConfig(Section):
    """A NetworkPolicy for the job's pods (on by default): they accept connections from each
    other only (rendezvous, NCCL / gloo), and reach each other, DNS (port 53) and
    `egress_cidrs` on `egress_ports` (object storage, the hub, the cloud's metadata endpoints for
    IRSA / Workload Identity). Enforced only where the cluster's network plugin implements
    NetworkPolicy (Calico, Cilium, ...); elsewhere the object is inert."""

    enabled: bool = True
    """Render the NetworkPolicy; false: the pods' traffic is whatever the namespace allows."""
    egress_cidrs: list[str] = Field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    """Address ranges the pods may connect to on `egress_ports`; empty: none (then data,
    checkpoints and the base model must come from volumes or the job's own pods)."""
    egress_ports: list[int] = Field(default_factory=lambda: [443, 80])
    """TCP ports allowed to `egress_cidrs`: HTTPS (object storage, hub) and HTTP (metadata
    endpoints, plain-HTTP S3 endpoints). Add e.g. 9000 for an in-cluster MinIO; empty: every port."""

    @field_validator("egress_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                if "/" not in cidr:
                    raise ValueError
                ipaddress.ip_network(cidr, strict=True)
            except ValueError:
                raise ValueError(
                    f"{cidr!r} is not a CIDR range (an address with its host bits zero and a prefix "
                    "length, e.g. 10.0.0.0/8, 0.0.0.0/0 or ::/0)"
                ) from None
        return v

    @field_validator("egress_ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for port in v:
            if not 1 <= port <= 65535:
                raise ValueError(f"{port} is not a TCP port (1-65535)")
        return v


class TrainJobConfig(Section):
    """Kubeflow Trainer v2 only (`backend: trainjob`)."""

    runtime: str = "ctrlnet-torch"
    """Name of the training runtime the TrainJob references: ctrlnet's own (manifests/runtime/
    ctrlnet-torch.yaml: torch-distributed with ctrlnet's exit-code restart policy), or another,
    e.g. Trainer's `torch-distributed` (no retry: any failed pod fails the job). Left unset, a
    submit to a cluster without ctrlnet-torch uses torch-distributed and says so."""
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    """Kind of that runtime: cluster-wide, or a TrainingRuntime in the job's namespace."""
    container: str = "node"
    """Name of the trainer container in the runtime's `node` replicated job."""


class ClusterConfig(Section):
    # The pattern and length also go into the chart's values.schema.json, so plain `helm install`
    # refuses the names `ctrlnet render` refuses; the validator below words the error for humans.
    name: str = Field(default="ctrlnet", json_schema_extra={"pattern": DNS1035.pattern, "maxLength": MAX_NAME})
    """Job name (DNS-1035: lowercase letters, digits, '-', starting with a letter; at most 50
    characters). Jobs are immutable: use one name per run."""
    namespace: str | None = None
    """Namespace of the job; unset: the Helm release namespace (`helm -n`), `default` for `ctrlnet render`."""
    backend: Literal["auto", "trainjob", "pytorchjob"] = "auto"
    """TrainJob trainer.kubeflow.org/v1alpha1 (Kubeflow Trainer v2), PyTorchJob kubeflow.org/v1
    (Training Operator v1.9, legacy), or `auto`: TrainJob where the cluster serves Trainer v2 with
    the runtime (`trainjob.runtime`), else PyTorchJob; offline (`render`, `validate`) TrainJob.
    A PyTorchJob-only setting (priority_class_name, ttl_seconds_after_finished) makes auto
    PyTorchJob; so does volcano.queue where the cluster has the Training Operator (ctrlnet's
    runtime has no podGroupPolicy)."""
    task: Literal["train", "precompute", "prepare"] = "train"
    """What the pods run, under the same launcher: `train` (the trainer), `precompute` (encode
    `train.data` into `train.data.cache`, each process its own shards; `ctrlnet precompute
    --cluster` sets it) or `prepare` (annotate `train.prepare.source` into `train.data.dataset`,
    each process its own shards; `ctrlnet prepare --cluster` sets it)."""
    image: str = "ghcr.io/ctrlnet/trainer:0.1.0"
    """Trainer image (docker/Dockerfile). Pin its digest (`repo@sha256:<64 hex>`, or
    `repo:tag@sha256:...`) so every pod and every restart runs the same image: `ctrlnet validate`
    warns on a tag, which the registry can move."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    """When the kubelet pulls the image."""
    image_pull_secrets: list[str] = Field(default_factory=list)
    """Names of docker-registry Secrets for a private registry."""
    nodes: int = Field(default=1, ge=1, le=MAX_NODES)
    """Pods, one per node (at most 10,000). PyTorchJob: 1 Master plus nodes-1 Workers; TrainJob: numNodes."""
    gpus_per_node: int = Field(default=1, ge=0, le=MAX_GPUS_PER_NODE)
    """GPUs per pod, and so torchrun processes per pod (0: one CPU process per pod; at most 64)."""
    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource name of a GPU (e.g. `amd.com/gpu`)."""
    resources: Resources = Field(default_factory=Resources)
    shm_size: str = Field(default="16Gi", json_schema_extra=_QUANTITY_SCHEMA)
    """Size limit of the in-memory /dev/shm volume (NCCL and DataLoader workers use it; it counts
    against the pod's memory)."""
    scratch_size: str = Field(default="100Gi", json_schema_extra=_QUANTITY_SCHEMA)
    """Size limit of the pod's scratch volume (an emptyDir on the node's disk): the container's
    root filesystem is read-only, and this volume holds /tmp (the staging copy of checkpoints
    and outputs bound for object storage, torchrun's logs) and HOME (hub, torch and triton
    caches, unless `cache` is enabled). A pod that outgrows it is evicted: allow a few
    checkpoints of the model plus the base model."""
    env: dict[str, str] = Field(default_factory=dict)
    """Plain (non-secret) env vars for the trainer, e.g. `NCCL_DEBUG: WARN`, `AWS_REGION: eu-west-1`.
    Credentials go in `secrets`, never here."""
    secrets: SecretsConfig = Field(default_factory=SecretsConfig)
    service_account: ServiceAccountConfig = Field(default_factory=ServiceAccountConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    network_policy: NetworkPolicyConfig = Field(default_factory=NetworkPolicyConfig)
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Pod nodeSelector, e.g. `nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3`."""
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    """Pod tolerations, written as in a Pod spec (e.g. `{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}`)."""
    affinity: dict[str, Any] = Field(default_factory=dict)
    """Pod affinity, written as in a Pod spec."""
    priority_class_name: str | None = None
    """Kubernetes PriorityClass of the pods (PyTorchJob only; for TrainJob set it in the runtime)."""
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    termination_grace_period_seconds: int = Field(default=600, ge=30, le=MAX_SECONDS)
    """Time between SIGTERM and SIGKILL: the trainer finishes its step and writes a checkpoint in it (at most a year)."""
    # In Kubeflow's order (common_types.go); `ctrlnet validate` lists the values in this order.
    restart_policy: Literal["Always", "OnFailure", "Never", "ExitCode"] = "ExitCode"
    """PyTorchJob replica restart policy. `ExitCode`: exit codes 1-127 fail the job for good,
    128-255 (SIGTERM -> 143, SIGKILL -> 137) restart the pod, which resumes from its last checkpoint."""
    backoff_limit: int = Field(default=3, ge=0, le=MAX_COUNT)
    """In-place container restarts (restart_policy OnFailure/Always) before the job is marked
    failed. Training Operator v1.9 does not count pods it re-creates after a retryable exit
    under ExitCode."""
    active_deadline_seconds: int | None = Field(default=None, ge=1, le=MAX_SECONDS)
    """Fail the job after running this long (at most a year); unset: no deadline."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, le=MAX_SECONDS)
    """Delete the finished job (and its pods) after this long (at most a year); unset: keep it. With GitOps
    self-heal a deleted job is re-created and trains again: see docs/gitops.md."""
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    """PyTorchJob: which pods to delete when the job finishes (`Running` frees the GPUs of pods
    still running, keeps finished pods and their logs)."""
    master_port: int = Field(default=23456, ge=1024, le=65535)
    """PyTorchJob rendezvous port (container port `pytorchjob-port`); TrainJob always uses 29500."""
    kueue: KueueConfig = Field(default_factory=KueueConfig)
    volcano: VolcanoConfig = Field(default_factory=VolcanoConfig)
    trainjob: TrainJobConfig = Field(default_factory=TrainJobConfig)
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on every object and pod (e.g. a team or cost center)."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Extra annotations on the job and its pods."""

    @field_validator("name")
    @classmethod
    def _dns1035(cls, v: str) -> str:
        if not DNS1035.match(v) or len(v) > MAX_NAME:
            raise ValueError(
                f"{v!r} is not a DNS-1035 job name: use at most {MAX_NAME} lowercase letters, digits "
                "and '-', starting with a letter and ending with a letter or digit, e.g. fill50k-run-1"
            )
        return v

    @field_validator("namespace")
    @classmethod
    def _dns1123(cls, v: str | None) -> str | None:
        if v is not None and (not DNS1123.match(v) or len(v) > 63):
            raise ValueError(f"{v!r} is not a namespace name (lowercase letters, digits and '-')")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not v.strip() or v != v.strip():
            raise ValueError("must be an image reference such as ghcr.io/org/trainer:0.1.0")
        if "@" in v and not IMAGE_DIGEST.search(v):
            raise ValueError(
                "a digest must be @sha256: and 64 lowercase hex digits, e.g. ghcr.io/org/trainer@sha256:0123…"
                " (docker buildx imagetools inspect IMAGE:TAG prints it)"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        # Before the fields, so no later message can quote the value: a token under env, labels or
        # annotations, or where a Secret's *name* belongs (secrets.hub_token: hf_...).
        refuse_credentials(data, "cluster")
        return data

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        return [_secret_name(name) for name in v]

    _shm = field_validator("shm_size")(_quantity("16Gi"))
    _scratch = field_validator("scratch_size")(_quantity("100Gi"))

    @field_validator("labels", "node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        _check_keys(v, "label key")
        for key, value in v.items():
            if problem := label_value_problem(value):
                raise ValueError(f"the value of {key}: {problem}")
        return v

    @field_validator("annotations")
    @classmethod
    def _annotation_keys(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_keys(v, "annotation key")

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name (letters, digits, '_')")
            if name in RESERVED_ENV:
                raise ValueError(f"{name} is set by the launcher and the Training Operator: remove it")
            if looks_secret(name):
                raise ValueError(
                    f"{name} looks like a credential: never put it inline; reference a Secret with "
                    f"cluster.secrets.env (e.g. {{name: {name}, secret: my-secret, key: {name.lower()}}})"
                )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterConfig":
        if self.kueue.queue and self.volcano.queue:
            raise ValueError(
                "kueue.queue and volcano.queue are both set: a job goes through one queueing system, pick one"
            )
        if self.volcano.min_available is not None and self.volcano.min_available > self.nodes:
            raise ValueError(
                f"volcano.min_available is {self.volcano.min_available} but there are only {self.nodes} nodes"
            )
        if (
            self.cache.enabled
            and self.cache.existing_claim is None
            and self.nodes > 1
            and self.cache.access_mode != "ReadWriteMany"
        ):
            raise ValueError(
                f"cache.access_mode {self.cache.access_mode} cannot be mounted by {self.nodes} nodes: use ReadWriteMany"
            )
        if self.backend == "trainjob":
            for key, value in self.pytorchjob_only_settings():
                if value is not None:
                    raise ValueError(
                        f"{key} is a PyTorchJob setting: with backend trainjob set it in the training runtime, or unset it"
                    )
        names = [e.name for e in self.secrets.env]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"secrets.env sets {n} twice")
            if n in self.env:
                raise ValueError(f"{n} is in both env and secrets.env: keep the Secret reference only")
            if n in RESERVED_ENV:
                raise ValueError(f"secrets.env: {n} is set by the launcher and the Training Operator: remove it")
        return self

    def pytorchjob_only_settings(self) -> list[tuple[str, object]]:
        """(key, value) of the settings only a PyTorchJob carries (a TrainJob takes them from its runtime)."""
        return [
            ("priority_class_name", self.priority_class_name),
            ("ttl_seconds_after_finished", self.ttl_seconds_after_finished),
        ]

    def backend_candidates(self) -> list[str]:
        """The backends this config may run as, in order of preference: the one it names, or for
        `auto` TrainJob then PyTorchJob (PyTorchJob only when a PyTorchJob-only setting is set)."""
        if self.backend != "auto":
            return [self.backend]
        if any(value is not None for _, value in self.pytorchjob_only_settings()):
            return ["pytorchjob"]
        if self.volcano.queue:  # a TrainJob gang-schedules only under a runtime with podGroupPolicy.volcano
            return ["pytorchjob", "trainjob"]
        return ["trainjob", "pytorchjob"]

    @property
    def offline_backend(self) -> str:
        """What `render` and `validate` produce without a cluster to ask: the first candidate."""
        return self.backend_candidates()[0]

    @property
    def procs_per_node(self) -> int:
        """torchrun processes per pod: one per GPU, or one on a CPU-only pod."""
        return self.gpus_per_node or 1


def with_cluster(cfg, **changes):
    """A copy of the JobConfig `cfg` with these cluster fields changed (how `auto` is resolved:
    offline by `render`, against the cluster by `submit`, with the TrainJob's runtime)."""
    return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update=changes)})
