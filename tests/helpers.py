"""Small builders shared by unit tests (pure data; no mocks of behaviour)."""

from __future__ import annotations

import time
from pathlib import Path

from llmepp.datalayer.endpoint import Endpoint, EndpointMetrics, EndpointSpec
from llmepp.request.types import InferenceRequest, RequestKind
from llmepp.server.tls import CERT_FILE, KEY_FILE, self_signed_pem

# A config that builds an App in file-discovery mode without touching any file until start-up.
FILE_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  parameters: {path: /nonexistent/endpoints.yaml}
- type: queue-scorer
dataLayer:
  discovery: {pluginRef: file-discovery}
"""


def endpoint(
    i: int,
    *,
    queue: int = 0,
    running: int = 0,
    kv: float = 0.0,
    labels: dict[str, str] | None = None,
    scraped: bool = True,
    block_size: int = 0,
    num_blocks: int = 0,
) -> Endpoint:
    ep = Endpoint(
        EndpointSpec(name=f"pod-{i}", address=f"10.0.{i // 250}.{i % 250 + 1}", port=8000, labels=labels or {})
    )
    ep.metrics = EndpointMetrics(
        waiting_queue_size=queue,
        running_requests_size=running,
        kv_cache_usage_percent=kv,
        cache_block_size=block_size,
        cache_num_blocks=num_blocks,
        update_time=time.monotonic() if scraped else 0.0,
    )
    return ep


def request(prompt: bytes | None = b"hello", model: str = "m", **kw: object) -> InferenceRequest:
    return InferenceRequest(
        request_id="r-1",
        path="/v1/completions",
        headers={},
        kind=RequestKind.COMPLETIONS if prompt is not None else RequestKind.PASSTHROUGH,
        model=model,
        target_model=model,
        prompt=prompt,
        **kw,  # type: ignore[arg-type]
    )


def write_cert_pair(directory: Path, host: str = "localhost") -> bytes:
    """A fresh self-signed tls.crt + tls.key in `directory` (created if needed); returns the certificate PEM."""
    cert, key = self_signed_pem((host,))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CERT_FILE).write_bytes(cert)
    (directory / KEY_FILE).write_bytes(key)
    return cert
