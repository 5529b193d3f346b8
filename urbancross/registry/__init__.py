"""MLflow model registry: the pyfunc model, promotion by aliases, and text->image search."""

from __future__ import annotations

import urllib.error
import urllib.request


class RegistryError(RuntimeError):
    """The tracking server or registry cannot serve the request."""


def check_tracking_server(uri: str, timeout: float = 5.0) -> str:
    """Fail fast, naming `uri`, when an HTTP tracking server does not answer /health.

    MLflow's own client retries for minutes before giving up; checking first makes a
    down server a one-line error and guarantees nothing was half-registered. Returns `uri`.
    """
    if not uri.startswith(("http://", "https://")):
        return uri
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status == 200:
                return uri
            problem = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise RegistryError(f"MLflow tracking server {uri} is not reachable ({problem}); start it or fix mlflow.tracking_uri")


__all__ = ["RegistryError", "check_tracking_server"]
