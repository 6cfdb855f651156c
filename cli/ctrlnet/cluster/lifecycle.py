"""Changing a run after submit: delete it (everything submitted with it, never its outputs),
suspend it, resume it."""

from __future__ import annotations

from ctrlnet.cluster.kube import Kube
from ctrlnet.cluster.runs import Run, run_selector
from ctrlnet.errors import ClusterError

# Objects a submit creates besides the job, found by the run's labels.
COMPANIONS = ("ConfigMap", "ServiceAccount", "PersistentVolumeClaim", "NetworkPolicy")


def delete_run(kube: Kube, run: Run) -> list[str]:
    """Delete the job (its pods go with it) and its companions; the names deleted."""
    deleted = []
    if kube.delete(run.backend.resource.kind, run.name, run.namespace):
        deleted.append(f"{run.backend.resource.kind}/{run.name}")
    for kind in COMPANIONS:
        for obj in kube.list(kind, run.namespace, labels=run_selector(run.name)):
            if kube.delete(kind, obj["metadata"]["name"], run.namespace):
                deleted.append(f"{kind}/{obj['metadata']['name']}")
    return deleted


def set_suspended(kube: Kube, run: Run, suspended: bool) -> str:
    """Suspend or resume; a line saying what happened. Refuses where the installed operator's
    schema has no suspend field (the API server drops or rejects it)."""
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
