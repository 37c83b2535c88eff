"""``python -m deploy.healthcheck``: the container image's health probe, for a SuperLink or a SuperNode.

Both serve ``/health`` on their HTTP API: the SuperLink over TLS on its one port, checked
against the federation CA (so the probe also catches a certificate that sites would
reject), a SuperNode on its local Runtime API port. The compose files say what each
container probes (``FEDTUNE_HEALTHCHECK_URL``, ``FEDTUNE_HEALTHCHECK_CA``); a container
that runs no Flower service, such as a one-off ``fedtune`` command, has nothing to probe.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request
from pathlib import Path

URL_VARIABLE = "FEDTUNE_HEALTHCHECK_URL"
CA_VARIABLE = "FEDTUNE_HEALTHCHECK_CA"


def probe(url: str, ca: Path | None = None, timeout: float = 5.0) -> str | None:
    """``None`` when ``url`` answers 200, else why not. Proxies are bypassed: the target is local."""
    handlers: list = [urllib.request.ProxyHandler({})]
    if url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca) if ca else None)))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except (OSError, ValueError) as exc:
        return f"{url}: {exc}"


def main() -> int:
    url = os.environ.get(URL_VARIABLE)
    if not url:
        print(f"healthy: no Flower service to probe ({URL_VARIABLE} is not set)")
        return 0
    ca = os.environ.get(CA_VARIABLE)
    problem = probe(url, Path(ca) if ca else None)
    print(problem or f"healthy: {url}")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
