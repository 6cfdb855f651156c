"""`ctrlnet validate`: offline checks of rendered objects, schemas first, then rules.

1. Schemas (ctrlnet.k8s.schemas): core kinds against kubernetes-validate's OpenAPI schemas,
   custom resources against the CRDs in ctrlnet/k8s/crds; unknown fields are problems.
2. Rules no schema encodes (ctrlnet.k8s.rules): DNS-1035 job names, a container named
   `pytorch`, Master replicas 1, GPU limit = processes per node, credentials by secretKeyRef
   only, the trainer's config loads, queued jobs created suspended, ...

Each problem is one line: `<Kind>/<name>: <field path>: <what is wrong and what to do>`.
"""

from __future__ import annotations

import copy
from typing import Any

from ctrlnet.k8s.problem import Problem
from ctrlnet.k8s.rules import rule_problems
from ctrlnet.k8s.schemas import DEFAULT_KUBE_VERSION, schema_problems

__all__ = ["DEFAULT_KUBE_VERSION", "Problem", "rule_problems", "schema_problems", "validate_objects"]


def validate_objects(
    objs: list[dict[str, Any]],
    kube_version: str = DEFAULT_KUBE_VERSION,
    secrets_seen: set[str] | None = None,
    warnings: list[Problem] | None = None,
) -> list[Problem]:
    """Every problem in `objs`: schema problems first, then rules; [] when all is well.
    `secrets_seen` collects the Secrets the objects reference, `warnings` the hardening advice
    (Problem.warning: rules marked @warning in ctrlnet.k8s.rules), which is never a problem."""
    problems: list[Problem] = []
    for obj in objs:
        if not isinstance(obj, dict):
            # Never quoted: a stray scalar document may be a pasted credential.
            problems.append(
                Problem(
                    "?", "", f"not a Kubernetes object: a {type(obj).__name__}, not a mapping with apiVersion and kind"
                )
            )
            continue
        problems += schema_problems(copy.deepcopy(obj), kube_version)
    found = rule_problems([o for o in objs if isinstance(o, dict)], secrets_seen)
    if warnings is not None:
        warnings += [p for p in found if p.warning]
    return problems + [p for p in found if not p.warning]
