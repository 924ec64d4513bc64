"""Secrets stay out of logs and outputs; voice URLs cannot reach private networks through DNS.

Where each security measure is tested:
- secrets in the worker's log, job outputs and errors, a failing job's traceback and the RunPod
  SDK's own lines included: here (a live worker with known fake secrets, at DEBUG); in the bridge's
  answers and logs: bridge/test/routes.spec.js ("secrets"), test_bridge_e2e.py, test_load.py; in S3
  error messages: test_storage.py; storage internals in bridge replies: test_faults.py,
  bridge/test/security.spec.js.
- voice URLs: loopback, private, link-local, metadata, IPv6 and every IPv6 form that carries an IPv4
  address, redirects, schemes, a server that trickles: test_voices.py (and test_faults.py through
  the worker loop); names that resolve to private addresses: here (DNS answers are monkeypatched
  in-process: there is no DNS server to point at a private address here).
- size caps: text (MAX_TEXT_LENGTH) tests/data/bad_jobs.json ("100k-character text"); base64 clips
  test_voices.py::test_size_cap_on_base64 and here through the worker loop; downloads
  test_voices.py::test_fetch_limits; bridge bodies bridge/test/speech.spec.js and
  bridge/test/data/bad_requests.json (413 cases); RunPod's payload limits in the emulator; a
  streamed job's final output: test_streaming_runpod.py.
- speaker names never leave the voices folder: test_voices.py and the bad-job corpus.
- object keys (uuid4), presigned URL expiry (S3_PRESIGN_EXPIRY) and the documented lifecycle rule:
  test_storage.py.
- the bridge's keys, owners, clip URLs, consent, quotas and headers: bridge/test/security.spec.js,
  bridge/test/properties.spec.js (several keys), bridge/test/bad_requests.spec.js (401 before any
  work, constant-time comparison), test_bridge_e2e.py (through the SDKs and `make bridge`).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from audio_helpers import encode_file, tone
from conftest import ROOT, RunpodAPI, running_api

from jobs.voices import VoiceError, VoiceLimits, fetch_audio

# One xdist worker runs this module (its fixtures start a worker with secrets set).
pytestmark = pytest.mark.xdist_group("security")

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
TINY = {"max_new_tokens": 2, "diffusion_steps": 1}
FAKE = os.urandom(4).hex()
SECRETS = {
    "HF_TOKEN": f"hf_fakeToken{FAKE}",
    "S3_ACCESS_KEY_ID": f"AKIAFAKEKEY{FAKE.upper()}",
    "S3_SECRET_ACCESS_KEY": f"fakeSecretAccessKey/{FAKE}",
    "RUNPOD_API_KEY": f"rpa_FAKEKEY{FAKE}",
    "AUTH_TOKEN": f"auth-fake-token-{FAKE}",
}


# What the failing job's exception says: a secret and a presigned URL, as a careless error message
# (or a library's) might quote them. The worker must log the traceback without either.
MARKER = "SECRETFAULT"
SIGNATURE = "X-Amz-Signature=" + FAKE * 8
FAULT_MESSAGE = (
    f"upload helper failed with token {SECRETS['AUTH_TOKEN']} for "
    f"http://127.0.0.1:9/bucket/key.mp3?X-Amz-Credential={SECRETS['S3_ACCESS_KEY_ID']}%2F20261201&{SIGNATURE}"
)


@pytest.fixture(scope="module")
def secret_api(tiny_model_dir, volume, s3_server, tmp_path_factory) -> Iterator[RunpodAPI]:
    """A worker holding known fake secrets, asked to log everything (its own DEBUG, and the SDK's,
    which it keeps at INFO), whose S3 takes its keys (results come back as presigned URLs) and
    in which a job with MARKER in its text fails with FAULT_MESSAGE (tests/fault_worker.py)."""
    env = {
        "MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu",
        "LOG_LEVEL": "DEBUG", "RUNPOD_DEBUG_LEVEL": "DEBUG", "MAX_CONCURRENCY": "2",
        "S3_ENDPOINT_URL": s3_server.endpoint, "S3_BUCKET_NAME": s3_server.bucket,
        "S3_MAX_ATTEMPTS": "1", "VOICE_MAX_BYTES": "100000",
        "FAULT_GENERATION_MARKER": MARKER, "FAULT_GENERATION_MESSAGE": FAULT_MESSAGE,
        **SECRETS,
    }  # fmt: skip
    command = [sys.executable, str(ROOT / "tests" / "fault_worker.py")]
    with running_api(tmp_path_factory.mktemp("secret-worker") / "worker.log", env, command=command) as api:
        yield api


def test_secrets_never_reach_logs_outputs_or_errors(secret_api: RunpodAPI) -> None:
    clip = base64.b64encode(encode_file(tone(200, 4.0, 24000), 24000, "wav", "pcm_s16le")).decode()
    jobs = {
        "succeeds": {"text": "A job that works.", "return": "base64", "output_format": "wav", **TINY},
        "streams": {"text": "A streamed job.", "stream": True, "output_format": "pcm_16", **TINY},
        "delivered by URL": {"text": "Upload me.", "return": "url", "output_format": "pcm_16", **TINY},
        "fails with a secret in scope": {"text": f"A {MARKER} job.", "output_format": "pcm_16", **TINY},
        "fails validation": {"text": "Bad.", "cfg_scale": 0},
        "unknown field": {"text": "Bad.", "hf_token": "x"},
        "clip over the size cap": {"text": "Cloned.", "voice_audio_base64": clip, **TINY},
        "lists voices": {"action": "list_voices"},
    }
    replies = {}
    for name, job_input in jobs.items():
        status, job = secret_api.call("POST", "/run", {"input": job_input})
        assert status == 200
        replies[name] = secret_api.wait_for(job["id"], FINAL)
    assert replies["succeeds"]["status"] == replies["streams"]["status"] == "COMPLETED"
    assert replies["fails validation"]["status"] == replies["unknown field"]["status"] == "FAILED"
    presigned = replies["delivered by URL"]["output"][0]["audio_url"]
    assert "X-Amz-Signature=" in presigned  # a presigned URL was in the job's output
    assert replies["fails with a secret in scope"]["error"].startswith("internal error while generating audio")
    assert replies["clip over the size cap"]["error"] == (
        "'voice_audio_base64' is larger than the 0.1 MB limit for reference audio."
    )

    log = secret_api.worker.log_path.read_text()
    assert "generation begins" in log  # the worker's own loggers were at DEBUG
    assert "upload helper failed with token" in log and "Traceback" in log  # the failure and its traceback
    assert "the RunPod SDK's log level DEBUG would print job outputs; it is kept at INFO" in log
    assert "Generator output" not in log and "Handler output" not in log  # the SDK printed no output
    # The presigned URL carries the access key id, by design of S3 signatures: the reply may hold it
    # there, and nowhere else.
    replies["delivered by URL"]["output"][0]["audio_url"] = "(presigned URL)"
    seen = {
        "worker log": log,
        "job replies": json.dumps(replies),
        "health": json.dumps(secret_api.call("GET", "/health")),
    }
    known = {
        **SECRETS,
        "RUNPOD_AI_API_KEY (the worker's own key)": secret_api.emulator.worker_key,
        "the presigned URL's signature": presigned.partition("X-Amz-Signature=")[2],
        "the signature in the failing job's traceback": SIGNATURE,
    }
    leaks = [f"{name} in the {where}" for name, value in known.items() for where, text in seen.items() if value in text]
    assert leaks == []


# --- voice URLs through DNS (answers monkeypatched in-process: no DNS server here) -------------------


def fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Make socket.getaddrinfo answer `answers` for those names; returns the names looked up."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return [address_info(address, port) for address in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.mark.parametrize(
    "addresses",
    [["10.20.30.40"], ["169.254.169.254"], ["192.168.1.1"], ["127.0.0.1"], ["::1"], ["fd00::1"],
     ["100.64.0.1"], ["93.184.216.34", "10.0.0.5"]],
    ids=["10/8", "metadata", "192.168/16", "loopback", "IPv6 loopback", "IPv6 unique local", "CGNAT",
         "one private answer among public ones"],
)  # fmt: skip
def test_names_that_resolve_to_private_addresses_are_refused(make_settings, monkeypatch, addresses: list[str]) -> None:
    fake_dns(monkeypatch, {"voices.example.com": addresses})
    limits = VoiceLimits.from_settings(make_settings(voice_fetch_timeout=2))
    with pytest.raises(VoiceError, match="private, loopback, link-local or reserved address"):
        fetch_audio("http://voices.example.com/clip.wav", "'voice_url'", limits)


def address_info(address: str, port: int) -> tuple:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (family, socket.SOCK_STREAM, 6, "", (address, port))


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/clip.wav":
            body = encode_file(tone(300, 1.0), 24000, "wav", "pcm_s16le")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(302)
        self.send_header("Location", "http://metadata.internal/latest/meta-data/")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def redirect_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_redirect_to_a_name_that_resolves_to_metadata_is_refused(
    make_settings, monkeypatch, redirect_server: int
) -> None:
    """The first hop's name resolves to the test server (its network is allowed for the test); the
    redirect names a host that resolves to the cloud metadata address, which is refused."""
    asked = fake_dns(monkeypatch, {"voices.test": ["127.0.0.1"], "metadata.internal": ["169.254.169.254"]})
    limits = VoiceLimits.from_settings(make_settings(voice_fetch_timeout=3, voice_url_allowed_networks="127.0.0.0/8"))
    with pytest.raises(VoiceError, match="private, loopback, link-local or reserved address"):
        fetch_audio(f"http://voices.test:{redirect_server}/redirect", "'voice_url'", limits)
    assert asked == ["voices.test", "metadata.internal"]


def test_each_name_is_resolved_once_and_the_checked_address_is_used(
    make_settings, monkeypatch, redirect_server: int
) -> None:
    """No second lookup between the check and the connection (DNS rebinding): a resolver that
    answers a private address the second time is never asked twice."""
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])
    real = socket.getaddrinfo
    asked: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return [address_info(address, port) for address in next(answers)]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    limits = VoiceLimits.from_settings(make_settings(voice_fetch_timeout=3, voice_url_allowed_networks="127.0.0.0/8"))
    data = fetch_audio(f"http://rebind.test:{redirect_server}/clip.wav", "'voice_url'", limits)
    assert data[:4] == b"RIFF"
    assert asked == ["rebind.test"]


def test_secret_scrubbing_covers_every_configured_secret(make_settings, monkeypatch) -> None:
    """The log filter's list: HF_TOKEN, both S3 keys, RUNPOD_API_KEY, the worker's RunPod key and AUTH_TOKEN."""
    for name in ("RUNPOD_API_KEY", "RUNPOD_AI_API_KEY", "AUTH_TOKEN"):
        monkeypatch.setenv(name, f"{name.lower()}-{FAKE}")
    settings = make_settings(
        hf_token=SECRETS["HF_TOKEN"],
        s3_access_key_id=SECRETS["S3_ACCESS_KEY_ID"],
        s3_secret_access_key=SECRETS["S3_SECRET_ACCESS_KEY"],
    )
    expected = {SECRETS["HF_TOKEN"], SECRETS["S3_ACCESS_KEY_ID"], SECRETS["S3_SECRET_ACCESS_KEY"]}
    expected |= {f"{name.lower()}-{FAKE}" for name in ("RUNPOD_API_KEY", "RUNPOD_AI_API_KEY", "AUTH_TOKEN")}
    assert set(settings.secret_values()) == expected
    assert SECRETS["S3_SECRET_ACCESS_KEY"] not in repr(settings)
    assert SECRETS["HF_TOKEN"] not in str(settings.model_dump())


def test_log_lines_are_scrubbed(caplog) -> None:
    import logging

    from runtime.logs import RedactSecrets

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token %s and %s", (SECRETS["HF_TOKEN"], "ok"), None)
    assert RedactSecrets([SECRETS["HF_TOKEN"]]).filter(record)
    assert record.getMessage() == "token *** and ok"


def test_tracebacks_stacks_and_signed_urls_are_scrubbed() -> None:
    """The whole record: its message, its traceback (the exception's text, the source lines that
    quote values) and its stack; every URL's query string (presigned S3 URLs, signed clip URLs)."""
    import io
    import logging

    from runtime.logs import RedactSecrets

    secret = SECRETS["AUTH_TOKEN"]
    clip = "https://bridge.example/voice-clips/clips%2Fvoice_1?expires=1&signature=" + "ab" * 32
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.addFilter(RedactSecrets([secret]))
    logger = logging.getLogger("vibevoice.test-redaction")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"failed with {secret} fetching {clip}")
        except RuntimeError:
            logger.error("job failed near %s", "https://s3.example/b/k?X-Amz-Signature=0123", exc_info=True)
        logger.error("where it happened", stack_info=True, extra={})
    finally:
        logger.removeHandler(handler)
    text = output.getvalue()
    assert "Traceback" in text and "RuntimeError: failed with *** fetching" in text
    assert secret not in text and "signature=abab" not in text and "X-Amz-Signature=0123" not in text
    assert "https://bridge.example/voice-clips/clips%2Fvoice_1?***" in text


def test_volume_paths_are_not_in_errors(secret_api: RunpodAPI, volume: Path) -> None:
    """Failures name the field, never the server's folders."""
    for job_input in ({"text": "x", "speaker": "../../../../etc/passwd"}, {"text": "x", "speaker": "nobody"}):
        _, job = secret_api.call("POST", "/run", {"input": job_input})
        reply = secret_api.wait_for(job["id"], FINAL)
        assert reply["status"] == "FAILED" and str(volume) not in reply["error"], reply
