"""Changing a run after submit: delete it (everything submitted with it, never its outputs),
suspend it, resume it."""

from __future__ import annotations

from dataclasses import dataclass

from ctrlnet.cluster.kube import RESOURCES, Kube
from ctrlnet.cluster.runs import Run, require_ours, run_selector
from ctrlnet.cluster.status import TERMINAL, job_phase
from ctrlnet.errors import ClusterError, UserError, one_line

# Objects a submit creates besides the job, found by the run's labels.
COMPANIONS = ("ConfigMap", "ServiceAccount", "PersistentVolumeClaim", "NetworkPolicy")


@dataclass
class Fate:
    """What became of one object a delete meant to remove."""

    object: str  # Kind/name, or Kind when listing that kind failed
    deleted: bool
    why: str = ""  # why not, when not deleted

    def __str__(self) -> str:
        return f"deleted {self.object}" if self.deleted else f"not deleted {self.object}: {self.why}"


def delete_run(kube: Kube, run: Run) -> list[Fate]:
    """Delete the job (its pods go with it) and its companions, each found by the run's labels;
    every object's fate, also when one part fails (the caller reports them all). Only a job
    ctrlnet submitted is deleted; a kind the cluster does not serve has nothing to delete."""
    require_ours(kube, run, "delete")
    fates = [_delete_one(kube, run.backend.resource.kind, run.name, run.namespace)]
    for kind in COMPANIONS:
        try:
            if not kube.served(RESOURCES[kind]):
                continue
            found = kube.list(kind, run.namespace, labels=run_selector(run.name))
        except UserError as e:
            fates.append(
                Fate(f"{kind} objects of run {run.name}", False, f"could not list them: {one_line(e, limit=300)}")
            )
            continue
        for obj in found:
            fates.append(_delete_one(kube, kind, obj["metadata"]["name"], run.namespace))
    return fates


def _delete_one(kube: Kube, kind: str, name: str, namespace: str) -> Fate:
    try:
        if kube.delete(kind, name, namespace):
            return Fate(f"{kind}/{name}", True)
        return Fate(f"{kind}/{name}", False, "already gone")
    except UserError as e:
        return Fate(f"{kind}/{name}", False, one_line(e, limit=300))


def set_suspended(kube: Kube, run: Run, suspended: bool) -> str:
    """Suspend or resume; a line saying what happened. Refuses where the installed operator's
    schema has no suspend field (the API server drops or rejects it), a job ctrlnet did not
    submit, and a finished run (nothing left to stop or start)."""
    verb = "suspend" if suspended else "resume"
    require_ours(kube, run, verb)
    phase = job_phase(run.job, run.backend.name)[0]
    if phase in TERMINAL:
        raise UserError(
            f"run {run.name} in namespace {run.namespace} has finished ({phase}): there is nothing to {verb}, "
            f"nothing was changed; `ctrlnet submit` starts a new run"
        )
    if run.backend.suspended(run.job) == suspended:
        return f"{run.name} is already {'suspended' if suspended else 'running (not suspended)'}"
    try:
        updated = kube.merge_patch(
            run.backend.resource.kind, run.name, run.backend.suspend_patch(suspended), run.namespace
        )
    except ClusterError as e:
        if "suspend" in str(e) and ("unknown field" in str(e) or "Additional properties" in str(e)):
            raise ClusterError(_no_suspend(run, kube)) from None
        raise
    if run.backend.suspended(updated) != suspended:
        # A structural schema without the field prunes it silently: the operator predates suspend.
        raise ClusterError(_no_suspend(run, kube))
    if suspended:
        return (
            f"suspended {run.name}: its pods stop (the trainer checkpoints on SIGTERM); "
            f"`ctrlnet resume {run.name} -n {run.namespace}` continues from the latest checkpoint"
        )
    return f"resumed {run.name}: new pods continue from the latest checkpoint"


def _no_suspend(run: Run, kube: Kube) -> str:
    path = ".".join(run.backend.suspend_path)
    return (
        f"the {run.backend.resource.kind} operator on the cluster of context {kube.conn.context} has no suspend "
        f"({path} is not in its schema): upgrade to {run.backend.resource.installed_by}"
    )
