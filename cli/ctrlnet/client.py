"""The Python API: `ctrlnet.Client`, what the `submit`, `status`, `logs`, `list`, `delete`, `suspend`
and `resume` commands are built on (they call it and print what it returns), and `render`.

    import ctrlnet
    client = ctrlnet.Client()                       # the kubeconfig's current context, its namespace
    job = ctrlnet.JobConfig.from_file("job.yaml").with_overrides(["train.optim.learning_rate=1e-4"])
    run = client.submit(job)                        # a Submitted: name, namespace, backend, output ...
    final = client.wait(run.name)                   # a RunStatus; RunFailed / WaitTimeout otherwise

Every failure is one of ctrlnet.errors' exceptions, carrying the CLI's one-line message and its
`exit_code`. The connection is made on the first call that needs the cluster (so a Client is cheap,
and the kubernetes client is imported only then). A Client is not meant for several threads at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrlnet.errors import DeleteIncomplete, ObjectsInvalid, RunFailed, RunNotFound, UserError, WaitTimeout

if TYPE_CHECKING:
    from ctrlnet.cluster.kube import Kube
    from ctrlnet.cluster.lifecycle import Fate
    from ctrlnet.cluster.logs import LogLine
    from ctrlnet.cluster.runs import Run
    from ctrlnet.cluster.status import RunStatus
    from ctrlnet.config import JobConfig


@dataclass
class Submitted:
    """What `Client.submit` did: the run's name and namespace, the backend it runs as, where it
    writes, and the objects sent (as the API server has them; with `dry_run`, nothing was kept)."""

    name: str
    namespace: str
    backend: str  # pytorchjob | trainjob
    kind: str  # PyTorchJob | TrainJob
    task: str  # train | precompute | prepare
    output: str  # the run's prefix (training), the cache (precompute) or the dataset (prepare)
    dry_run: bool
    objects: list[dict] = field(repr=False)
    warnings: list[str] = field(default_factory=list)  # hardening advice on the objects, never a refusal
    queue: str | None = None  # the Kueue LocalQueue the job waits in
    output_warning: str | None = None  # the output lives only inside the pods
    note: str | None = None  # what resolving the backend against the cluster had to say

    def as_dict(self) -> dict[str, Any]:
        """The `ctrlnet submit -o json` document."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "backend": self.backend,
            "task": self.task,
            "output": self.output,
            "dry_run": self.dry_run,
            "warnings": self.warnings,
            "objects": self.objects
            if self.dry_run
            else [{"kind": o["kind"], "name": o["metadata"]["name"]} for o in self.objects],
        }


@dataclass
class RunRow:
    """One run as `ctrlnet list` shows it (`as_dict()`: the `ctrlnet list -o json` row)."""

    name: str
    namespace: str
    backend: str
    phase: str
    pods_ready: int
    pods: int
    step: int | None
    total: int | None
    age_s: int | None
    output: str | None
    _row: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRow:
        known = {k: row.get(k) for k in cls.__dataclass_fields__ if not k.startswith("_")}
        return cls(**known, _row=dict(row))

    def as_dict(self) -> dict[str, Any]:
        if self._row:
            return dict(self._row)
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class Deleted:
    """What `Client.delete` removed (`deleted`: Kind/name each), what it could not (`failed`), and
    where the run's outputs are (never deleted)."""

    name: str
    namespace: str
    deleted: list[str]
    failed: list[Fate]
    output: str | None


class Client:
    """One cluster: `context` (default: the kubeconfig's current one, or in-cluster in a pod) and
    `namespace` (default: the context's, else `default`), as `--context` and `-n` do."""

    def __init__(self, context: str | None = None, namespace: str | None = None):
        self.context, self._namespace = context, namespace
        self._kube: Kube | None = None

    # ------------------------------------------------------------ the connection
    @property
    def kube(self) -> Kube:
        """The connection, made on first use (UserError / ClusterError when it cannot be)."""
        if self._kube is None:
            from ctrlnet.cluster.connect import connect
            from ctrlnet.cluster.kube import Kube

            self._kube = Kube(connect(self.context, self._namespace))
        return self._kube

    def connect(self) -> Client:
        """Connect now (else the first call that needs the cluster does); the Client."""
        self.kube  # noqa: B018 - the property connects
        return self

    @property
    def namespace(self) -> str:
        """Where runs are submitted and looked up (connects, to read the context's default)."""
        return self.kube.namespace

    def _run(self, name: str) -> Run:
        from ctrlnet.cluster.runs import find_run

        return find_run(self.kube, name)

    # ------------------------------------------------------------ submit
    def submit(
        self,
        job: JobConfig | str | Path,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        name: str | None = None,
        dry_run: bool = False,
        kube_version: str = "1.30",
    ) -> Submitted:
        """A new run of `job` (a JobConfig, or a job file's path), plus `a.b=c` overrides: named
        `name` (default: cluster.name plus a random suffix), validated, checked against the cluster
        and server-side applied (`dry_run`: the API server checks everything and keeps nothing).
        Raises UserError (bad config or name), ObjectsInvalid (the objects break the schemas: its
        `problems`), ClusterError (missing operator, a run of that name, ...)."""
        from ctrlnet.cluster import submit as sub

        kube = self.kube
        plan = sub.plan(job, tuple(overrides), name=name, namespace=kube.namespace, kube=kube)
        warnings: list[str] = []
        problems = sub.problems(plan, kube_version, warnings)
        if problems:
            raise ObjectsInvalid(
                f"{len(problems)} problem(s) in the objects of run {plan.name}; nothing was sent", problems
            )
        sub.check_cluster(kube, plan)
        applied = sub.apply(kube, plan, dry_run=dry_run)
        return Submitted(
            name=plan.name,
            namespace=plan.namespace,
            backend=plan.backend.name,
            kind=plan.backend.resource.kind,
            task=plan.cfg.cluster.task,
            output=plan.output,
            dry_run=dry_run,
            objects=applied,
            warnings=warnings,
            queue=sub.queue_of(plan),
            output_warning=sub.output_warning(plan),
            note=plan.note,
        )

    # ------------------------------------------------------------ reading runs
    def list(self, *, all_namespaces: bool = False) -> list[RunRow]:
        """This tool's runs in the namespace (or every namespace), oldest first per namespace.
        UserError when the namespace does not exist."""
        from ctrlnet.cluster.listing import list_runs
        from ctrlnet.cluster.runs import namespace_missing, no_such_namespace

        kube = self.kube
        rows = [RunRow.from_row(r) for r in list_runs(kube, all_namespaces=all_namespaces)]
        if not rows and not all_namespaces and namespace_missing(kube, kube.namespace):
            raise no_such_namespace(kube, kube.namespace)
        return rows

    def get(self, name: str) -> RunRow:
        """The run's row, as `list` has it. RunNotFound when there is no such run."""
        from ctrlnet.cluster.listing import run_row

        run = self._run(name)
        if run.ours:  # what `list` selects on
            return RunRow.from_row(run_row(self.kube, run))
        raise RunNotFound(
            f"{run.backend.resource.kind} {run.name!r} in namespace {run.namespace} was not submitted by ctrlnet: "
            f"`ctrlnet list -n {run.namespace}` shows the runs there"
        )

    def status(self, name: str) -> RunStatus:
        """The run's status: phase and why, queue, every rank's pod, training progress (the
        `ctrlnet status -o json` document is its `as_dict()`). RunNotFound when there is no such run."""
        from ctrlnet.cluster import status as st

        return st.gather(self.kube, self._run(name))

    def watch(self, name: str, *, timeout: float | None = None) -> Iterator[RunStatus]:
        """The run's status now and on every change until it finishes (the last one yielded is
        final) or `timeout` seconds pass (then the last one is not). Close it to stop early."""
        from ctrlnet.cluster.follow import watch_status

        run = self._run(name)
        deadline = None if timeout is None else time.monotonic() + timeout
        return watch_status(self.kube, run, deadline=deadline)

    def wait(self, name: str, *, timeout: float | None = 3600) -> RunStatus:
        """Wait until the run finishes; its final status when it Succeeded. RunFailed (its
        `status`) when it Failed, WaitTimeout (its last `status`; the run goes on) after
        `timeout` seconds (None: no limit), RunNotFound when there is no such run."""
        statuses = self.watch(name, timeout=timeout)
        last = None
        try:
            for status in statuses:
                last = status
        finally:
            statuses.close()
        assert last is not None  # watch yields at least once
        ns = f" -n {last.namespace}"
        if last.phase == "Failed":
            why = ": ".join(x for x in (last.reason, last.message) if x) or _pod_reason(last) or "no reason given"
            raise RunFailed(
                f"run {last.name} in namespace {last.namespace} failed ({why}): "
                f"`ctrlnet status {last.name}{ns}` and `ctrlnet logs {last.name}{ns}` show why",
                last,
            )
        if not last.finished:
            raise WaitTimeout(
                f"run {last.name} in namespace {last.namespace} is still {last.phase} after {timeout:g} s "
                f"(it goes on): wait longer, or follow it with `ctrlnet status {last.name}{ns} -w`",
                last,
            )
        return last

    def logs(
        self,
        name: str,
        *,
        follow: bool = False,
        rank: int | None = None,
        pod: str | None = None,
        tail: int | None = None,
        since: str | int | None = None,
        previous: bool = False,
        timestamps: bool = False,
    ) -> Iterator[LogLine]:
        """The run's log lines, every rank's (or one `rank`'s, or one `pod`'s: a name or a role
        like worker-1), each a LogLine (rank, role, text). `follow`: wait for pods to start, go on
        across restarts (a `--- container re-created ...` note line), end when the job has finished.
        `tail`: the last N lines of each pod; `since`: seconds, or a duration like "10m"."""
        from ctrlnet.cluster.logs import LogOptions, RunLogs, parse_since

        if rank is not None and pod is not None:
            raise UserError("give --rank or --pod, not both")
        if previous and follow:
            raise UserError("--previous shows a finished container's log: it cannot be followed; drop -f")
        since_s = since if isinstance(since, int) and not isinstance(since, bool) else parse_since(since)
        options = LogOptions(
            follow=follow, tail=tail, since_s=since_s, previous=previous, timestamps=timestamps, rank=rank, pod=pod
        )
        return RunLogs(self.kube, self._run(name), options).lines()

    # ------------------------------------------------------------ changing runs
    def suspend(self, name: str) -> str:
        """Suspend the run (its pods stop; the trainer checkpoints); a line saying what happened."""
        from ctrlnet.cluster.lifecycle import set_suspended

        return set_suspended(self.kube, self._run(name), True)

    def resume(self, name: str) -> str:
        """Resume a suspended run (new pods continue from its latest checkpoint); a line saying
        what happened."""
        from ctrlnet.cluster.lifecycle import set_suspended

        return set_suspended(self.kube, self._run(name), False)

    def delete(self, name: str, *, confirm: Callable[[str, str], object] | None = None) -> Deleted:
        """Delete the run: its job and every object submitted with it; its outputs are kept.
        `confirm(name, namespace)` is asked first (after the run is found and is ctrlnet's): a
        false answer deletes nothing (UserError). DeleteIncomplete (its `result`) when some
        objects were not deleted; UserError for a job ctrlnet did not submit."""
        from ctrlnet.cluster.lifecycle import delete_run
        from ctrlnet.cluster.runs import require_ours

        kube = self.kube
        run = self._run(name)
        require_ours(kube, run, "delete")
        if confirm is not None and not confirm(run.name, run.namespace):
            raise UserError(f"delete {run.name}: not confirmed; nothing was deleted")
        fates = delete_run(kube, run)
        result = Deleted(
            name=run.name,
            namespace=run.namespace,
            deleted=[f.object for f in fates if f.deleted],
            failed=[f for f in fates if not f.deleted and f.why != "already gone"],
            output=run.output,
        )
        if result.failed:
            raise DeleteIncomplete(
                f"{len(result.failed)} object(s) of run {run.name} were not deleted (each listed above with why); "
                f"fix that and run `ctrlnet delete {run.name} -n {run.namespace}` again",
                result,
            )
        return result


def render(job: JobConfig | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """The Kubernetes objects of `job` (a JobConfig or a job file's path, plus overrides), in
    apply order: what `ctrlnet render` prints. Offline (`cluster.backend: auto` renders as it
    would without a cluster to ask). UserError on a bad config."""
    from ctrlnet.cluster.submit import load
    from ctrlnet.k8s.render import render_objects

    return render_objects(load(job, tuple(overrides)))


def _pod_reason(s: RunStatus) -> str | None:
    return next((f"{p.role}: {p.reason}" for p in s.pods if p.reason and p.exit_code not in (None, 0)), None)
