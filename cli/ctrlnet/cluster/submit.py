"""`ctrlnet submit`: one job file -> a new, uniquely named run on the cluster.

Every submit is a new run: a generated name (`<cluster.name>-<5 random>`, like Kubernetes'
generateName) unless `--name` is given, and its own output prefix `<train.output>/<run name>`:
`train.output` is the root under which runs land, so two submits of one file never share or
clobber outputs. The user sees the prefix at submit time; an existing job of that name, or an
output prefix that already holds a run (when the workstation can read the store), is refused
before anything is sent.

Order: validate (the same checks as `ctrlnet validate`) -> check the cluster serves what the job
needs -> server-side apply (field manager `ctrlnet`) of the ServiceAccount, ConfigMap, PVC and
NetworkPolicy, then the job.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from ctrlnet.cluster.kube import RESOURCES, Kube
from ctrlnet.cluster.runs import BACKENDS, KUEUE_QUEUE_LABEL, MANAGED_BY, OUTPUT_ANNOTATION, TOOL
from ctrlnet.config import JobConfig, load_job_config
from ctrlnet.config.cluster import MAX_NAME
from ctrlnet.config.contract import RUN_FILE
from ctrlnet.errors import ClusterError, UserError

_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
_SUFFIX_LEN = 5


def generated_name(base: str) -> str:
    """`base-xxxxx`, within the job-name limit and still a DNS-1035 label."""
    stem = base[: MAX_NAME - _SUFFIX_LEN - 1].rstrip("-")
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

    @property
    def backend(self):
        return BACKENDS[self.cfg.cluster.backend]


def plan(file: str | None, overrides: list[str], *, name: str | None, namespace: str) -> Plan:
    """Load, name, place and validate the run; render its objects. Raises on any problem."""
    from ctrlnet.k8s.render import render_objects

    base = load_job_config(file, overrides, for_cluster=True)
    run_name = name or generated_name(base.cluster.name)
    output = run_output(base.train.output, run_name)
    cfg = _placed(base, run_name, namespace, output)
    objects = render_objects(cfg)
    for obj in objects:  # `ctrlnet submit` objects say so; a Helm release of the same chart says Helm
        obj["metadata"].setdefault("labels", {})[MANAGED_BY] = TOOL
    return Plan(cfg, objects, run_name, namespace, output)


def _placed(base: JobConfig, name: str, namespace: str, output: str) -> JobConfig:
    """`base` with the four values a submit decides: name, namespace, output, output annotation."""
    from ctrlnet.config.loading import validate

    data = base.model_dump(mode="json")
    data["cluster"].update(name=name, namespace=namespace)
    data["cluster"]["annotations"] = {**data["cluster"]["annotations"], OUTPUT_ANNOTATION: output}
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
    taken = output_holds_a_run(p.output)
    if taken:
        raise UserError(f"output {p.output} already holds a run: choose another --name (or another train.output root)")


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
    return (
        f"train.output {p.output} is a path inside the pod: checkpoints and the model are lost when the pod "
        f"goes; use object storage (s3://, gs://) or a path under the cache volume ({cache.mount_path})"
    )


def apply(kube: Kube, p: Plan, *, dry_run: bool) -> list[dict]:
    """Server-side apply every object, in dependency order; the objects as the server has them."""
    applied = []
    for obj in p.objects:
        applied.append(kube.apply(obj, dry_run=dry_run) or obj)
    return applied


def queue_of(p: Plan) -> str | None:
    return (p.objects[-1]["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL)
