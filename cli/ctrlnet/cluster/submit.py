"""`ctrlnet submit`: one job file -> a new, uniquely named run on the cluster.

Every submit is a new run: a generated name (`<cluster.name>-<5 random>`, like Kubernetes'
generateName) unless `--name` is given, and its own output prefix `<train.output>/<run name>`:
`train.output` is the root under which runs land, so two submits of one file never share or
clobber outputs. The user sees the prefix at submit time; an existing job of that name, or an
output prefix that already holds a run (when the workstation can read the store), is refused
before anything is sent.

A precompute job (`cluster.task: precompute`, `ctrlnet precompute --cluster`) is submitted the same
way, named `<cluster.name>-precompute-<5 random>`, with the same labels (so status, logs, list and
delete find it). It writes `train.data.cache`, not a run prefix: its output is that cache, which a
later run reads and a restarted precompute completes (finished shards are kept), so the "output
holds a run" rule does not apply. Two writers of one cache at once are refused instead: a submit
whose cache an unfinished precompute job in the namespace writes (a precompute job, or a training
run that would read a half-written cache) is refused, naming that job.

A prepare job (`cluster.task: prepare`, `ctrlnet prepare --cluster`) is the same again, named
`<cluster.name>-prepare-<5 random>`: its output is the dataset it writes, `train.data.dataset`, and
the one-writer rule holds for that dataset (a second prepare job into it, or a training run or a
precompute job that would read it half-written, is refused while an unfinished prepare job writes it).

Order: connect -> load the config -> resolve `cluster.backend` against the cluster (`auto` ->
PyTorchJob or TrainJob: backend_choice.choose_backend, in plan()) -> name, place, render -> validate (the
same checks as `ctrlnet validate`) -> check the cluster serves what the job needs -> server-side
apply (field manager `ctrlnet`) of the ServiceAccount, ConfigMap, PVC and NetworkPolicy, then the job.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from ctrlnet.cluster.backend_choice import choose_backend
from ctrlnet.cluster.kube import RESOURCES, Kube
from ctrlnet.cluster.runs import BACKENDS, KUEUE_QUEUE_LABEL, MANAGED_BY, OUTPUT_ANNOTATION, TOOL, Run, tool_selector
from ctrlnet.config import JobConfig, load_job_config
from ctrlnet.config.cluster import DNS1035, MAX_NAME
from ctrlnet.config.contract import RUN_FILE
from ctrlnet.config.credentials import shown
from ctrlnet.config.loading import validate
from ctrlnet.errors import ClusterError, UserError

_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
_SUFFIX_LEN = 5


PRECOMPUTE_SUFFIX = "-precompute"
PREPARE_SUFFIX = "-prepare"
COMPONENT = "app.kubernetes.io/component"
"""The chart's label saying what a job's pods run: `training`, `precompute` or `prepare` (cluster.task)."""


def generated_name(base: str, kind: str = "") -> str:
    """`base<kind>-xxxxx`, within the job-name limit and still a DNS-1035 label (`base` is
    shortened first, so `kind`, e.g. -precompute or -prepare, always shows)."""
    stem = base[: MAX_NAME - _SUFFIX_LEN - 1 - len(kind)].rstrip("-") + kind
    return f"{stem}-{''.join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(_SUFFIX_LEN))}"


def run_output(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


@dataclass
class Plan:
    """What a submit will create."""

    cfg: JobConfig
    objects: list[dict]
    name: str
    namespace: str
    output: str
    note: str | None = None  # what resolving the backend against the cluster has to say

    @property
    def backend(self):
        return BACKENDS[self.cfg.cluster.backend]

    @property
    def precompute(self) -> bool:
        return self.cfg.cluster.task == "precompute"

    @property
    def prepare(self) -> bool:
        return self.cfg.cluster.task == "prepare"

    @property
    def output_key(self) -> str:
        """The config key `output` comes from, for messages."""
        return {"precompute": "train.data.cache", "prepare": "train.data.dataset"}.get(
            self.cfg.cluster.task, "train.output"
        )


def check_name(name: str) -> None:
    """A `--name` a job can carry (a DNS-1035 label within the job-name limit), blamed on --name."""
    if not DNS1035.match(name) or len(name) > MAX_NAME:
        raise UserError(
            f"--name {shown(name)} is not a run name: lowercase letters, digits and '-', starting with a "
            f"letter and ending with a letter or digit, at most {MAX_NAME} characters"
        )


def load(job: JobConfig | str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """The job to submit, validated for a cluster: a JobConfig (plus overrides), or a job file
    (plus overrides) read as `ctrlnet submit -f FILE --set ...` reads it."""
    if isinstance(job, JobConfig):
        cfg = job.with_overrides(list(overrides)) if overrides else job
        if cfg._source is not None:  # from_file / with_overrides: validated for a cluster already
            return cfg
        # Built in code (JobConfig(...), model_validate): the cluster's rules too. What was set
        # stays what was set (resolving `auto` tells a default from a choice).
        return validate(JobConfig, cfg.model_dump(mode="json", exclude_unset=True), {"target": "cluster"})
    return load_job_config(job, list(overrides), for_cluster=True)


def plan(
    job: JobConfig | str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    name: str | None,
    namespace: str,
    kube: Kube | None = None,
) -> Plan:
    """Load (a job file or a JobConfig, plus overrides), resolve the backend against the cluster
    (when `kube` is given; else `auto` renders as `ctrlnet render` does), name, place and validate
    the run; render its objects. Raises on any problem."""
    if name is not None:
        check_name(name)
    from ctrlnet.k8s.render import render_objects

    base = load(job, overrides)
    note = None
    if kube is not None:  # the one place the backend is resolved against the cluster
        base, note = choose_backend(kube, base)
    if base.cluster.task == "precompute":  # writes the cache the config names (validated: it is set)
        run_name = name or generated_name(base.cluster.name, PRECOMPUTE_SUFFIX)
        output = base.train.data.cache
    elif base.cluster.task == "prepare":  # writes the dataset the config names (validated: it is set)
        run_name = name or generated_name(base.cluster.name, PREPARE_SUFFIX)
        output = base.train.data.dataset
    else:
        run_name = name or generated_name(base.cluster.name)
        output = run_output(base.train.output, run_name)
    cfg = _placed(base, run_name, namespace, output)
    objects = render_objects(cfg)
    for obj in objects:  # `ctrlnet submit` objects say so; a Helm release of the same chart says Helm
        obj["metadata"].setdefault("labels", {})[MANAGED_BY] = TOOL
    return Plan(cfg, objects, run_name, namespace, output, note)


def _placed(base: JobConfig, name: str, namespace: str, output: str) -> JobConfig:
    """`base` with the values a submit decides: name, namespace, the output annotation and (for a
    training run) its output prefix."""
    data = base.model_dump(mode="json")
    data["cluster"].update(name=name, namespace=namespace)
    data["cluster"]["annotations"] = {**data["cluster"]["annotations"], OUTPUT_ANNOTATION: output}
    if base.cluster.task == "train":
        data["train"]["output"] = output
    return validate(JobConfig, data)  # e.g. a --name that is not a DNS-1035 label: one line


def problems(p: Plan, kube_version: str, warnings: list[str] | None = None) -> list[str]:
    """`ctrlnet validate`'s problems with the run's objects; its warnings (hardening advice,
    never a reason to refuse) go into `warnings`."""
    from ctrlnet.k8s.validate import validate_objects

    found: list = []
    out = [str(x) for x in validate_objects(p.objects, kube_version=kube_version, warnings=found)]
    if warnings is not None:
        warnings += [str(w) for w in found]
    return out


def check_cluster(kube: Kube, p: Plan) -> None:
    """Refuse what would fail on this cluster: a missing operator, queue system or namespace, a
    job name in use, an output prefix that holds a run."""
    cluster = p.cfg.cluster
    kube.require(p.backend.resource)
    if p.cfg.cluster.network_policy.enabled and not kube.served(RESOURCES["NetworkPolicy"]):
        raise ClusterError(no_network_policy(kube))
    if cluster.kueue.queue:
        kube.require(RESOURCES["Workload"], f" (the job asks for Kueue queue {cluster.kueue.queue!r})")
    if cluster.volcano.queue:
        kube.require(RESOURCES["PodGroup"], f" (the job asks for Volcano queue {cluster.volcano.queue!r})")
    existing = kube.get(p.backend.resource.kind, p.name, p.namespace)
    if existing is not None:
        raise ClusterError(
            f"a {p.backend.resource.kind} named {p.name!r} already exists in namespace {p.namespace} "
            f"(created {existing['metadata'].get('creationTimestamp', '?')}): choose another --name, "
            f"or remove it with `ctrlnet delete {p.name} -n {p.namespace}`"
        )
    if p.cfg.cluster.task == "train" and output_holds_a_run(p.output):
        raise UserError(f"output {p.output} already holds a run: choose another --name (or another train.output root)")
    cache = p.cfg.train.data.cache
    writer = cache and not p.prepare and cache_writer(kube, cache, p.namespace)
    if writer:
        doing = "writing it too" if p.precompute else "training on a half-written cache"
        raise ClusterError(
            f"precompute job {writer} in namespace {p.namespace} is still writing cache {cache}: two jobs "
            f"would be {doing}; wait for it (`ctrlnet status {writer} -n {p.namespace} -w`) or delete it"
        )
    dataset = p.cfg.train.data.dataset
    writer = dataset and dataset_writer(kube, dataset, p.namespace)
    if writer:
        doing = {"prepare": "writing it too", "precompute": "encoding a half-written dataset"}.get(
            p.cfg.cluster.task, "training on a half-written dataset"
        )
        raise ClusterError(
            f"prepare job {writer} in namespace {p.namespace} is still writing dataset {dataset}: two jobs "
            f"would be {doing}; wait for it (`ctrlnet status {writer} -n {p.namespace} -w`) or delete it"
        )


def no_network_policy(kube: Kube) -> str:
    return (
        f"the cluster of context {kube.conn.context} does not serve NetworkPolicy (networking.k8s.io/v1), "
        "part of Kubernetes itself, not a CRD to install: set cluster.network_policy.enabled=false to "
        "submit without one, or ask the cluster's admin to enable the NetworkPolicy API"
    )


def cache_writer(kube: Kube, cache: str, namespace: str) -> str | None:
    """The unfinished precompute job in `namespace` that writes `cache`, if any (a finished one has
    left it complete, or resumable by a new job)."""
    return _writer(kube, "precompute", cache, namespace)


def dataset_writer(kube: Kube, dataset: str, namespace: str) -> str | None:
    """The unfinished prepare job in `namespace` that writes `dataset`, if any (a finished one has
    left it complete, or resumable by a new job)."""
    return _writer(kube, "prepare", dataset, namespace)


def _writer(kube: Kube, component: str, output: str, namespace: str) -> str | None:
    """The unfinished job of `component` (its pods' label) in `namespace` whose output is `output`."""
    from ctrlnet.cluster.status import TERMINAL, job_phase

    want = output.rstrip("/")
    for backend in BACKENDS.values():
        if not kube.served(backend.resource):
            continue
        for job in kube.list(backend.resource.kind, namespace, labels=f"{tool_selector()},{COMPONENT}={component}"):
            run = Run(job, backend)
            if (run.output or "").rstrip("/") == want and job_phase(job, backend.name)[0] not in TERMINAL:
                return run.name
    return None


def output_holds_a_run(url: str) -> bool:
    """Whether `url` holds a run, when this machine can read the store; False when it cannot tell
    (no credentials here, or a path that exists only inside the pods)."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        return bool(fs.exists(f"{root.rstrip('/')}/{RUN_FILE}"))
    except Exception:  # noqa: BLE001 - any failure to look means "cannot tell"; the trainer checks again
        return False


def output_warning(p: Plan) -> str | None:
    """A word when the outputs would live only inside the pod (gone with it)."""
    cache = p.cfg.cluster.cache
    if "://" in p.output and not p.output.startswith("file://"):
        return None
    if cache.enabled and p.output.startswith(cache.mount_path.rstrip("/") + "/"):
        return None
    if p.precompute:
        lost = "the cache is lost with the pods (and other pods never see it)"
    elif p.prepare:
        lost = "the dataset is lost with the pods (and other pods never see it)"
    else:
        lost = "checkpoints and the model are lost when the pod goes"
    return (
        f"{p.output_key} {p.output} is a path inside the pod: {lost}; use object storage (s3://, gs://) "
        f"or a path under the cache volume ({cache.mount_path})"
    )


def apply(kube: Kube, p: Plan, *, dry_run: bool) -> list[dict]:
    """Server-side apply every object, in dependency order; the objects as the server has them."""
    applied = []
    for obj in p.objects:
        applied.append(kube.apply(obj, dry_run=dry_run) or obj)
    return applied


def queue_of(p: Plan) -> str | None:
    return (p.objects[-1]["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL)
