"""`ctrlnet status`: one run on one screen — the job's phase and why, its queue, every rank's pod
(and, for a pod that is not running, the reason in plain words), and training progress.

`gather()` reads the cluster into a `RunStatus` (also the stable `-o json` document, see
`RunStatus.as_dict`); `render()` draws it as text. Pure functions of API objects below the
gathering, so the reasons are testable without a cluster.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ctrlnet.cluster import draw
from ctrlnet.cluster.kube import Kube
from ctrlnet.cluster.runs import KUEUE_QUEUE_LABEL, Run, pod_rank, restart_attempt
from ctrlnet.config.progress import latest_progress
from ctrlnet.errors import ClusterError

if TYPE_CHECKING:
    from rich.console import RenderableType

TERMINAL = ("Succeeded", "Failed")
RETRYABLE_MIN = 128  # ExitCode restart policy: 128-255 restart the pod, 1-127 fail the job
CTRLNET_RUNTIME = "ctrlnet-torch"  # ctrlnet's ClusterTrainingRuntime: the same meaning of exit codes
PROGRESS_TAIL = 400  # log lines read from the master pod to find the newest progress lines
ROW_JOBS = ("precompute", "prepare")  # progress lines whose `step` counts rows, not optimizer steps


@dataclass
class PodStatus:
    name: str
    role: str  # master-0, worker-2, node-1
    rank: int
    phase: str
    ready: bool
    restarts: int
    node: str | None
    age_s: int | None
    reason: str | None = None  # why it is not running, in plain words
    exit_code: int | None = None
    retryable: bool | None = None  # under the ExitCode policy (or ctrlnet's TrainJob runtime)


@dataclass
class QueueStatus:
    system: str  # kueue | volcano
    name: str | None
    state: str  # Pending, Admitted, Inqueue, Running, ...
    reason: str | None = None


@dataclass
class RunStatus:
    """The `-o json` document: these fields, stable; times are UTC ISO 8601, durations seconds."""

    name: str
    namespace: str
    backend: str
    phase: str  # Created, Running, Restarting, Succeeded, Failed, Suspended
    reason: str | None
    message: str | None
    since: str | None
    restarts: int  # recreated + in_place
    recreated: int  # pods re-created by the operator after a retryable exit (ExitCode; TrainJob: JobSet restarts)
    in_place: int  # containers restarted in place by the kubelet (what backoffLimit counts)
    backoff_limit: int | None
    output: str | None
    queue: QueueStatus | None
    last_exit: dict[str, Any] | None  # newest pod exit the operator reported: pod, exit_code, meaning, time
    pods: list[PodStatus] = field(default_factory=list)
    progress: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ reading the cluster
def gather(kube: Kube, run: Run, *, progress: bool = True) -> RunStatus:
    ns = run.namespace
    pods = kube.list("Pod", ns, labels=run.backend.pod_selector(run.name))
    pods.sort(key=lambda p: pod_rank(p)[0])
    events = _events_by_object(kube.list("Event", ns))
    phase, reason, message, since = job_phase(run.job, run.backend.name)
    status = RunStatus(
        name=run.name,
        namespace=ns,
        backend=run.backend.name,
        phase=phase,
        reason=reason,
        message=message,
        since=since,
        **job_restarts(run.job, pods, events.get(run.job["metadata"].get("uid"), []), run.backend.name),
        backoff_limit=_backoff_limit(run.job),
        last_exit=last_exit(events.get(run.job["metadata"].get("uid"), [])),
        output=run.output,
        queue=queue_status(kube, run),
        pods=[pod_status(p, events.get(p["metadata"].get("uid"), []), run.job) for p in pods],
    )
    if progress:
        status.progress = read_progress(kube, run, pods)
    return status


def _events_by_object(events: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in events:
        uid = (e.get("involvedObject") or {}).get("uid")
        if uid:
            out.setdefault(uid, []).append(e)
    for items in out.values():
        items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return out


def read_progress(kube: Kube, run: Run, pods: list[dict]) -> dict[str, Any] | None:
    """A TrainJob's own status.trainerStatus first (what the trainer POSTs to Trainer's status
    server), with the checkpoint from the rank-0 log, unless that log is already at a later step;
    else the newest progress line of the rank-0
    pod; when it has none yet (a pod just re-created, or gone), what the run's own files say, if
    this machine can read its output store."""
    current = max((restart_attempt(p) for p in pods), default=0)
    master = next((p for p in pods if pod_rank(p)[0] == 0 and restart_attempt(p) == current), None)
    reported = trainer_status_progress(run.job) if run.backend.name == "trainjob" else None
    logged = _log_progress(kube, run, master) if master is not None else None
    if reported is not None and logged and (logged.get("step") or 0) > (reported.get("step") or 0):
        reported = None  # the trainer reports at most every 5 s: a newer log line wins
    if reported is not None and not logged and run.output:  # pods just re-created: what the run committed
        stored = progress_from_output(run.output)
        if stored and (stored.get("step") or 0) > (reported.get("step") or 0):
            return stored
        if stored and stored.get("checkpoint"):  # the status has no checkpoint; the store says which
            reported["checkpoint"] = stored["checkpoint"]
    if reported is not None:
        if logged and logged.get("checkpoint"):
            reported["checkpoint"] = logged["checkpoint"]
        return reported
    if logged:
        return logged
    return progress_from_output(run.output) if run.output else None


def _log_progress(kube: Kube, run: Run, master: dict) -> dict[str, Any] | None:
    """The newest progress line in the rank-0 pod's log (None: no log, or none yet)."""
    container = trainer_container(master)
    state = (container_status(master, container) or {}).get("state") or {}
    if "running" not in state and "terminated" not in state:
        return None
    try:
        name = master["metadata"]["name"]
        lines = list(kube.log_lines(name, container, namespace=run.namespace, tail=PROGRESS_TAIL))
    except ClusterError:  # the container changed state since the listing (a restart): no log now
        return None
    return latest_progress(lines)


_METRICS = ("loss", "lr", "samples_per_s", "epoch")  # trainer/ctrlnet_trainer/metrics.py sends these, step, total_steps


def trainer_status_progress(job: dict) -> dict[str, Any] | None:
    """Progress from a TrainJob's status.trainerStatus, in latest_progress's shape (step, total,
    loss, lr, samples_per_s, epoch, eta_s, percent, time) with "source": "trainerStatus"; None
    when the trainer has reported nothing (a controller without the TrainJobStatus gate)."""
    ts = ((job.get("status") or {}).get("trainerStatus")) or None
    if not ts:
        return None
    metrics = {m.get("name"): m.get("value") for m in ts.get("metrics") or [] if m.get("name")}

    def number(text: Any) -> float | int | None:
        try:
            value = float(text)
        except (TypeError, ValueError):
            return None
        return int(value) if re.fullmatch(r"-?\d+", str(text).strip()) else value

    out: dict[str, Any] = {"event": "step", "source": "trainerStatus"}
    step, total = number(metrics.get("step")), number(metrics.get("total_steps"))
    if step is not None:
        out["step"] = int(step)
    if total is not None:
        out["total"] = int(total)
    for name in _METRICS:
        if (value := number(metrics.get(name))) is not None:
            out[name] = value
    if ts.get("progressPercentage") is not None:
        out["percent"] = int(ts["progressPercentage"])
    if ts.get("estimatedRemainingSeconds") is not None:
        out["eta_s"] = int(ts["estimatedRemainingSeconds"])
    if ts.get("lastUpdatedTime"):
        out["time"] = ts["lastUpdatedTime"]
    if step is not None and total is not None and step >= total:
        out["event"] = "done"
    return out if ("step" in out or "percent" in out) else None


def progress_from_output(url: str) -> dict[str, Any] | None:
    """Progress from the run's files: the newest metrics line, and checkpoints/latest with its
    trainer_state.json (for the total). None when the store cannot be read from here."""
    import fsspec

    from ctrlnet.config import contract

    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        progress: dict[str, Any] = {"event": "step", "source": "output"}
        latest = f"{root}/{contract.CHECKPOINTS_DIR}/{contract.LATEST}"
        if fs.exists(latest):
            name = fs.cat_file(latest).decode().strip()
            state = json.loads(fs.cat_file(f"{root}/{contract.CHECKPOINTS_DIR}/{name}/{contract.TRAINER_STATE}"))
            progress.update(
                step=state["step"],
                total=state["total_steps"],
                checkpoint=f"{url.rstrip('/')}/{contract.CHECKPOINTS_DIR}/{name}",
            )
        metrics = f"{root}/{contract.METRICS_FILE}"
        if fs.exists(metrics):
            rows = [ln for ln in fs.cat_file(metrics).decode().splitlines() if ln.strip()]
            if rows:
                row = json.loads(rows[-1])
                progress.update(step=row["step"], loss=row.get("loss"), samples_per_s=row.get("samples_per_s"))
        return progress if "step" in progress else None
    except Exception:  # noqa: BLE001 - no credentials here, a path only the pods see, ...: no fallback
        return None


def queue_status(kube: Kube, run: Run) -> QueueStatus | None:
    labels = run.job["metadata"].get("labels") or {}
    queue = labels.get(KUEUE_QUEUE_LABEL)
    if queue:
        from ctrlnet.cluster.kube import RESOURCES

        if not kube.served(RESOURCES["Workload"]):
            return QueueStatus("kueue", queue, "Unknown", "Kueue is not installed: the job stays suspended")
        uid = run.job["metadata"].get("uid")
        workloads = [
            w
            for w in kube.list("Workload", run.namespace)
            if any(o.get("uid") == uid for o in w["metadata"].get("ownerReferences") or [])
        ]
        if not workloads:
            return QueueStatus(
                "kueue", queue, "Pending", "no Workload yet: is Kueue's integration for this job kind on?"
            )
        return kueue_state(queue, workloads[0])
    sched = ((run.job.get("spec") or {}).get("runPolicy") or {}).get("schedulingPolicy") or {}
    if sched.get("queue"):
        from ctrlnet.cluster.kube import RESOURCES

        group = kube.get("PodGroup", run.name, run.namespace) if kube.served(RESOURCES["PodGroup"]) else None
        phase = ((group or {}).get("status") or {}).get("phase") or "Pending"
        return QueueStatus("volcano", sched["queue"], phase, _last_message((group or {}).get("status") or {}))
    return None


# ------------------------------------------------------------------ interpreting objects
def job_phase(job: dict, backend: str) -> tuple[str, str | None, str | None, str | None]:
    """(phase, reason, message, since) from the job's conditions: the last one that holds."""
    conditions = ((job.get("status") or {}).get("conditions")) or []
    holding = [c for c in conditions if c.get("status") == "True"]
    if backend == "trainjob":
        mapping = {"Complete": "Succeeded", "Failed": "Failed", "Suspended": "Suspended"}
        holding = [dict(c, type=mapping.get(c.get("type"), c.get("type"))) for c in holding]
        if not any(c["type"] in mapping.values() for c in holding):
            active = sum(int(j.get("active") or 0) for j in (job.get("status") or {}).get("jobsStatus") or [])
            return ("Running" if active else "Created"), None, None, None
    if not holding:
        suspended = ((job.get("spec") or {}).get("runPolicy") or {}).get("suspend")
        return ("Suspended" if suspended else "Created"), None, None, None
    # The operator appends conditions as the job moves on (kubectl's STATE column shows the last).
    last = holding[-1]
    return last["type"], last.get("reason"), last.get("message"), last.get("lastTransitionTime")


def _backoff_limit(job: dict) -> int | None:
    """The PyTorchJob's runPolicy.backoffLimit (a TrainJob's Job backoffLimit is in its runtime,
    which a namespaced Role cannot read: None)."""
    spec = job.get("spec") or {}
    value = (spec.get("runPolicy") or {}).get("backoffLimit")
    return int(value) if value is not None else None


def job_restarts(job: dict, pods: list[dict], job_events: list[dict], backend: str = "pytorchjob") -> dict[str, int]:
    """Restarts so far, by kind: pods the operator re-created after a retryable exit (ExitCode:
    pods it created beyond one per replica per start or resume, from its SuccessfulCreatePod
    events; Training Operator v1.9 does not count these against backoffLimit) and containers the
    kubelet restarted in place (OnFailure; these count). Events live about an hour on a real API
    server, so older re-creations drop out of the count. A TrainJob: its JobSet's restarts (each
    re-creates every node's pod), read from the pods' restart-attempt label (no RBAC on JobSets)."""
    in_place = sum(
        int(cs.get("restartCount") or 0) for p in pods for cs in (p.get("status") or {}).get("containerStatuses") or []
    )
    if backend == "trainjob":
        recreated = max((restart_attempt(p) for p in pods), default=0)
        return {"restarts": recreated + in_place, "recreated": recreated, "in_place": in_place}

    def count(reason_suffix: str) -> int:
        return sum(int(e.get("count") or 1) for e in job_events if (e.get("reason") or "").endswith(reason_suffix))

    specs = ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values()
    replicas = sum(int(r.get("replicas") or 0) for r in specs)
    starts = 1 + count("Resumed")
    recreated = max(0, count("SuccessfulCreatePod") - replicas * starts) if replicas else 0
    return {"restarts": recreated + in_place, "recreated": recreated, "in_place": in_place}


_EXITED = re.compile(r"^Pod: (?:[^.]+)\.(\S+) exited with code (-?\d+)")


def last_exit(job_events: list[dict]) -> dict[str, Any] | None:
    """The newest non-zero pod exit from the operator's ExitedWithCode events: why the last restart
    (or failure) happened, after the pod itself is gone."""
    for event in reversed(job_events):
        m = _EXITED.match(event.get("message") or "") if event.get("reason") == "ExitedWithCode" else None
        if m and int(m.group(2)) != 0:
            code = int(m.group(2))
            return {
                "pod": m.group(1),
                "exit_code": code,
                "meaning": _exit_meaning(code).strip(" ()") or None,
                "time": event.get("lastTimestamp") or event.get("eventTime"),
            }
    return None


def kueue_state(queue: str, workload: dict) -> QueueStatus:
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
    for kind in ("Finished", "Evicted", "Admitted", "QuotaReserved"):
        c = conditions.get(kind)
        if c and c.get("status") == "True":
            state = {"QuotaReserved": "QuotaReserved"}.get(kind, kind)
            return QueueStatus("kueue", queue, state, c.get("message"))
    c = conditions.get("QuotaReserved") or conditions.get("Admitted")
    reason = (c or {}).get("message") or (c or {}).get("reason")
    return QueueStatus("kueue", queue, "Pending", reason or "waiting for quota")


def _last_message(status: dict) -> str | None:
    conditions = status.get("conditions") or []
    return conditions[-1].get("message") if conditions else None


def trainer_container(pod: dict) -> str:
    containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
    for preferred in ("pytorch", "node", "trainer"):
        if preferred in containers:
            return preferred
    return containers[0] if containers else "pytorch"


def container_status(pod: dict, name: str) -> dict | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == name:
            return cs
    return None


def age_seconds(timestamp: str | None) -> int | None:
    if not timestamp:
        return None
    then = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return max(0, int((dt.datetime.now(dt.UTC) - then).total_seconds()))


def _exit_code_policy(job: dict, role: str) -> bool:
    """Whether 128-255 restart and 1-127 fail: a PyTorchJob replica under restartPolicy ExitCode, or
    a TrainJob on ctrlnet's runtime (manifests/runtime/ctrlnet-torch.yaml: podFailurePolicy FailJob
    on 1-127 and a JobSet restart otherwise)."""
    spec = job.get("spec") or {}
    if job.get("kind") == "TrainJob" or "runtimeRef" in spec:
        return (spec.get("runtimeRef") or {}).get("name") == CTRLNET_RUNTIME
    return _restart_policy(job, role) == "ExitCode"


def _restart_policy(job: dict, role: str) -> str | None:
    specs = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
    rtype = "Master" if role.startswith("master") else "Worker"
    return (specs.get(rtype) or {}).get("restartPolicy")


def pod_status(pod: dict, events: list[dict], job: dict) -> PodStatus:
    meta, st = pod["metadata"], pod.get("status") or {}
    rank, role = pod_rank(pod)
    container = trainer_container(pod)
    cs = container_status(pod, container) or {}
    out = PodStatus(
        name=meta["name"],
        role=role,
        rank=rank,
        phase=st.get("phase") or "Pending",
        ready=bool(cs.get("ready")),
        restarts=int(cs.get("restartCount") or 0),
        node=(pod.get("spec") or {}).get("nodeName"),
        age_s=age_seconds(meta.get("creationTimestamp")),
    )
    if meta.get("deletionTimestamp"):
        out.phase = "Terminating"
    out.reason, out.exit_code = pod_reason(pod, cs, events)
    if out.exit_code is not None and out.exit_code != 0:
        out.retryable = out.exit_code >= RETRYABLE_MIN if _exit_code_policy(job, role) else None
    return out


def pod_reason(pod: dict, cs: dict, events: list[dict]) -> tuple[str | None, int | None]:
    """(why the pod is not running, in plain words; exit code of its last run) — (None, None) when
    it runs normally."""
    st = pod.get("status") or {}
    if st.get("reason") == "Evicted":
        return f"evicted by the node: {st.get('message') or 'node pressure'}", None
    state = cs.get("state") or {}
    if "terminated" in state or ("waiting" in state and "terminated" in (cs.get("lastState") or {})):
        term = state.get("terminated") or cs["lastState"]["terminated"]
        code = term.get("exitCode")
        if term.get("reason") == "OOMKilled":
            return (
                "killed for exceeding its memory limit (OOMKilled): raise cluster.resources.memory or "
                "lower train.loop.batch_size"
            ), code
        if code == 0:
            return ("completed" if "terminated" in state else None), 0
        what = _exit_meaning(code)
        if "waiting" in state and state["waiting"].get("reason") == "CrashLoopBackOff":
            return (
                f"crash-looping (CrashLoopBackOff): the trainer exits {code}{what}; see `ctrlnet logs --previous`",
                code,
            )
        return f"exited {code}{what}", code
    if "waiting" in state:
        w = state["waiting"]
        reason, message = w.get("reason") or "Waiting", w.get("message") or ""
        if reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
            image = next((c.get("image") for c in pod["spec"]["containers"] if c["name"] == cs.get("name")), "?")
            return (
                f"cannot pull image {image} ({reason}): {message or 'check the name, tag and imagePullSecrets'}",
                None,
            )
        if reason == "CreateContainerConfigError":
            return (
                f"cannot start the container (CreateContainerConfigError): {message} (a missing Secret or ConfigMap?)",
                None,
            )
        if reason in ("ContainerCreating", "PodInitializing"):
            mounts = [e for e in events if e.get("reason") == "FailedMount"]
            if mounts:  # e.g. cluster.secrets.as_files with a missing Secret, or one without the key
                return (
                    f"cannot mount a volume (FailedMount): {mounts[-1].get('message') or '?'} "
                    "(a missing Secret, or one without the key the job names?)",
                    None,
                )
            return "starting (pulling the image and mounting volumes)", None
        return f"{reason}: {message}".rstrip(": "), None
    for cond in st.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            sched = [e for e in events if e.get("reason") == "FailedScheduling"]
            message = (sched[-1].get("message") if sched else None) or cond.get("message") or "no node fits"
            return f"waiting for a node (FailedScheduling): {message}", None
    if st.get("phase") == "Pending":
        return "waiting to be scheduled", None
    return None, None


def _exit_meaning(code: int | None) -> str:
    if code is None:
        return ""
    meanings = {
        1: " (an error: see the log)",
        2: " (bad input: see the error line in the log)",
        137: " (SIGKILL: out of memory or killed after the grace period)",
        143: " (SIGTERM: preempted; the trainer checkpointed)",
    }
    return meanings.get(code, " (killed by a signal)" if code > 128 else "")


# ------------------------------------------------------------------ drawing it
def render(s: RunStatus) -> str:
    """The status as plain text (what `ctrlnet status` prints off a terminal)."""
    return draw.plain(view(s))


def view(s: RunStatus) -> RenderableType:
    """The status as rich draws it: the run's lines, then a table of its pods and why any of them
    is not running."""
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    parts: list[RenderableType] = [Text(line) for line in _run_lines(s)]
    if s.pods:
        pods = draw.table("RANK", "POD", "PHASE", "READY", "RESTARTS", "NODE", "AGE")
        for x in s.pods:
            pods.add_row(
                str(x.rank),
                x.name,
                draw.phase(x.phase),
                "yes" if x.ready else "no",
                str(x.restarts),
                x.node or "-",
                human_duration(x.age_s) if x.age_s is not None else "-",
            )
        parts += [Text(""), Padding(pods, (0, 0, 0, 2), expand=False)]
        parts += [Text(f"  {x.role}: {x.reason}{_retry_note(x)}") for x in s.pods if x.reason]
    elif s.phase not in TERMINAL:
        parts.append(Text("  pods: none yet" + (" (suspended)" if s.phase == "Suspended" else "")))
    return Group(*parts)


def _retry_note(x: PodStatus) -> str:
    if x.retryable is None:
        return ""
    if x.retryable:
        return " — retryable: the pod restarts and resumes"
    return " — permanent: the job fails without retrying"


def _run_lines(s: RunStatus) -> list[str]:
    """The lines above the pods: phase and why, restarts, last exit, queue, output, progress."""
    lines = [f"{s.backend} {s.namespace}/{s.name}: {s.phase}" + (f" since {s.since}" if s.since else "")]
    if s.reason or s.message:
        lines.append(f"  {s.reason or ''}{': ' if s.reason and s.message else ''}{s.message or ''}")
    limit = f" (backoffLimit {s.backoff_limit})" if s.backoff_limit is not None else ""
    if s.recreated and s.backend == "trainjob":
        lines.append(
            f"  restarts: {s.recreated} JobSet restart(s) after a retryable exit (every node's pod re-created), "
            f"{s.in_place} in place"
        )
    elif s.recreated:
        lines.append(
            f"  restarts: {s.recreated} pod(s) re-created after a retryable exit, {s.in_place} in place{limit}"
        )
    else:
        lines.append(f"  restarts: {s.in_place}{limit}")
    if s.last_exit:
        e = s.last_exit
        meaning = f" ({e['meaning']})" if e.get("meaning") else ""
        lines.append(f"  last exit: {e['pod']} exited {e['exit_code']}{meaning} at {e.get('time') or '?'}")
    if s.queue:
        q = s.queue
        lines.append(f"  queue: {q.system} {q.name or '?'}: {q.state}" + (f" ({q.reason})" if q.reason else ""))
    if s.output:
        lines.append(f"  output: {s.output}")
    p = s.progress
    if p:
        unit = "rows" if p.get("job") in ROW_JOBS else "step"  # a precompute / prepare job counts rows
        parts = [f"{unit} {p.get('step')}" + (f"/{p['total']}" if p.get("total") else "")]
        if p.get("loss") is not None:
            parts.append(f"loss {p['loss']:.4f}")
        if p.get("samples_per_s") is not None:
            parts.append(f"{p['samples_per_s']:.1f} {'rows' if unit == 'rows' else 'samples'}/s")
        if p.get("eta_s") is not None and p.get("event") != "done":
            parts.append(f"ETA {human_duration(p['eta_s'])}")
        source = {
            "output": " (from the output store; the rank-0 log has none yet)",
            "trainerStatus": " (from the TrainJob's trainerStatus)",
        }.get(p.get("source"), "")
        lines.append("  progress: " + ", ".join(parts) + source)
        if unit == "step":  # a precompute / prepare job has no checkpoints: its shards are its progress
            lines.append(f"  checkpoint: {p.get('checkpoint') or 'none committed yet'}")
    else:
        lines.append("  progress: no progress line yet")
    return lines


def summary_line(s: RunStatus) -> str:
    """One line for a log of changes (`status -w` off a terminal)."""
    pods = ", ".join(f"{x.role}={x.phase}" for x in s.pods) or "no pods"
    p = s.progress
    unit = "rows" if p and p.get("job") in ROW_JOBS else "step"
    step = f" {unit} {p.get('step')}" + (f"/{p['total']}" if p.get("total") else "") if p else ""
    queue = f" queue {s.queue.state}" if s.queue else ""
    return f"{s.phase}{queue}{step} [{pods}] restarts={s.restarts}"


def human_duration(seconds: int | float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
