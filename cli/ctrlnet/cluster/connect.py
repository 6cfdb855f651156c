"""Cluster access the way kubectl users expect: the kubeconfig from KUBECONFIG (a ':'-separated
list) or ~/.kube/config, `--context`, the context's namespace as the default for `-n`, and the
in-cluster service account inside a pod. Nothing here prints a credential: errors name files,
contexts and servers only (a server URL is shown without any user:password part)."""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ctrlnet.errors import UserError, one_line
from ctrlnet.extras import needs

_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class Connection:
    """An authenticated client for one cluster, and where commands act by default."""

    api: object  # kubernetes.client.ApiClient
    namespace: str
    context: str  # "in-cluster" inside a pod
    server: str  # API server URL, without credentials


def kubeconfig_paths() -> list[Path]:
    raw = os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def public_url(url: str) -> str:
    """`url` without a user:password part (a kubeconfig server may carry one)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def connect(context: str | None = None, namespace: str | None = None) -> Connection:
    """A Connection for `context` (default: the kubeconfig's current one, or in-cluster in a pod)."""
    with needs("k8s"):
        from kubernetes import client, config

    if namespace is not None and (not _NAMESPACE.match(namespace) or len(namespace) > 63):
        raise UserError(f"-n {namespace!r} is not a namespace name (lowercase letters, digits and '-')")
    paths = [p for p in kubeconfig_paths() if p.is_file()]
    if not paths and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return _in_cluster(namespace)
    if not paths:
        where = os.environ.get("KUBECONFIG") and f"KUBECONFIG={os.environ['KUBECONFIG']}" or "~/.kube/config"
        raise UserError(
            f"no kubeconfig found ({where}): point KUBECONFIG at one or create ~/.kube/config "
            "(e.g. `aws eks update-kubeconfig`, `gcloud container clusters get-credentials`, `kind export kubeconfig`)"
        )
    files = os.pathsep.join(str(p) for p in paths)
    try:
        # Not list_kube_config_contexts: it refuses a kubeconfig without current-context, which
        # kubectl (and ctrlnet) accept when --context names one.
        merged = config.kube_config.KubeConfigMerger(files).config.value or {}
        entries = [getattr(c, "value", c) for c in merged.get("contexts") or []]
        contexts = [c for c in entries if isinstance(c, dict) and c.get("name")]
        current_name = merged.get("current-context")
        current = next((c for c in contexts if c["name"] == current_name), None)
    except config.ConfigException as e:
        raise UserError(f"the kubeconfig ({files}) cannot be read: {one_line(e, limit=300)}") from None
    except Exception as e:  # noqa: BLE001 - a malformed file raises whatever its parser raises
        raise UserError(f"the kubeconfig ({files}) cannot be read ({type(e).__name__}): fix or replace it") from None
    names = [c["name"] for c in contexts or []]
    if context is not None and context not in names:
        raise UserError(
            f"context {context!r} is not in the kubeconfig ({files}); its contexts: {', '.join(names) or 'none'}"
        )
    if context is None and current_name and not current:
        raise UserError(
            f"the kubeconfig's current-context {current_name!r} is not among its contexts ({files}): "
            f"pass --context (one of: {', '.join(names) or 'none'}) or fix current-context"
        )
    if context is None and not current:  # with --context, kubectl needs no current-context either
        raise UserError(f"the kubeconfig ({files}) has no current context: pass --context (one of: {', '.join(names)})")
    chosen = next(c for c in contexts if c["name"] == (context or current["name"]))
    configuration = client.Configuration()
    with _library_log() as logged:
        try:
            config.load_kube_config(
                config_file=files, context=chosen["name"], client_configuration=configuration, persist_config=False
            )
        except config.ConfigException as e:
            raise UserError(f"context {chosen['name']!r} in {files} cannot be used: {_credential_text(e)}") from None
        except OSError as e:  # an auth-provider's cmd-path that cannot be run
            raise UserError(
                f"context {chosen['name']!r} in {files} cannot be used: its credential command cannot be run "
                f"({e.strerror or type(e).__name__}: {e.filename or '?'}); install it or fix the kubeconfig's user"
            ) from None
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(
                f"context {chosen['name']!r} in {files} cannot be used: its user's credentials are malformed "
                f"({type(e).__name__}): fix the kubeconfig"
            ) from None
    plugin_failure = next((m for m in logged if m.startswith("exec:")), None)
    if plugin_failure is not None:
        raise UserError(
            f"context {chosen['name']!r} in {files}: its exec credential plugin failed: "
            f"{_credential_text(plugin_failure)}; log in again (the plugin's own command) or choose another --context"
        )
    _bounded(configuration)
    default_ns = (chosen.get("context") or {}).get("namespace") or "default"
    return Connection(
        client.ApiClient(configuration), namespace or default_ns, chosen["name"], public_url(configuration.host)
    )


def _bounded(configuration) -> None:
    """No retries inside the client: one call is bounded by one deadline (kube.Kube._call), where
    urllib3's default of 3 retries made a 15 s timeout cost 60 s."""
    from urllib3.util.retry import Retry

    configuration.retries = Retry(total=0, connect=0, read=0, redirect=0, status=0, other=0)


@contextmanager
def _library_log():
    """What the kubernetes client logs while loading credentials (it logs an exec plugin's failure
    on the root logger and goes on without credentials): collected, not printed."""
    messages: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if "kubernetes" in (record.pathname or ""):
            messages.append(record.getMessage())
            return False
        return True

    root = logging.getLogger()
    # logging.error() would call basicConfig() on a root logger without handlers: a stray
    # "ERROR:root:" line now and a handler that prints every later record twice.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder:
        root.addHandler(placeholder)
    root.addFilter(keep)
    try:
        yield messages
    finally:
        root.removeFilter(keep)
        if placeholder:
            root.removeHandler(placeholder)


def _credential_text(error) -> str:
    """The first line of a credential failure, with anything token-shaped left out."""
    from ctrlnet.config.credentials import credential_kind

    text = error if isinstance(error, str) else one_line(error, limit=300)
    text = text.splitlines()[0] if text.strip() else text
    words = [
        f"<{credential_kind(w, blobs=True)}, not shown>" if credential_kind(w, blobs=True) else w for w in text.split()
    ]
    return " ".join(words)[:300]


def _in_cluster(namespace: str | None) -> Connection:
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as e:
        raise UserError(
            f"in-cluster configuration failed: {one_line(e, limit=300)}; mount a service account token or use a kubeconfig"
        ) from None
    ns_file = _SA_DIR / "namespace"
    default_ns = ns_file.read_text().strip() if ns_file.is_file() else "default"
    _bounded(configuration)
    return Connection(
        client.ApiClient(configuration), namespace or default_ns, "in-cluster", public_url(configuration.host)
    )
