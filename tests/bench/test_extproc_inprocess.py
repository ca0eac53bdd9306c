"""extproc_overhead's in-process step: it replays what Envoy sends, and it measures a routed request."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from benchmarks.extproc_overhead import IN_PROCESS_STEPS, REPO, REQUEST_BODY, RESPONSE_JSON, envoy_messages
from llmepp.server import envoy


def test_the_replayed_messages_are_envoys_six_for_a_small_request() -> None:
    messages = [pb.ProcessingRequest.FromString(raw) for raw in envoy_messages()]
    assert [m.WhichOneof("request") for m in messages] == [
        "request_headers",
        "request_body",
        "request_body",
        "response_headers",
        "response_body",
        "response_body",
    ]
    # Envoy ends each body with a message of its own (observed with Envoy 1.40 for a content-length body).
    assert (messages[1].request_body.body, messages[1].request_body.end_of_stream) == (REQUEST_BODY, False)
    assert (messages[2].request_body.body, messages[2].request_body.end_of_stream) == (b"", True)
    assert (messages[4].response_body.body, messages[4].response_body.end_of_stream) == (RESPONSE_JSON, False)
    assert messages[5].response_body.end_of_stream
    assert messages[0].protocol_config.request_body_mode == envoy.MODE_FULL_DUPLEX_STREAMED
    assert messages[0].protocol_config.response_body_mode == envoy.MODE_FULL_DUPLEX_STREAMED


@pytest.mark.parametrize("target", ["noop", "fake", "default"])
def test_an_inprocess_run_times_every_step_of_a_routed_request(target: str) -> None:
    """The run fails unless the EPP routed each request, so its numbers are never those of a refusal."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.extproc_overhead", "inprocess-run", "--target", target, "--n", "50"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    steps = json.loads(out.stdout)
    assert len(steps) == len(IN_PROCESS_STEPS)
    assert all(us > 0 for us in steps)
