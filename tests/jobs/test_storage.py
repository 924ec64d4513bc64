"""Delivery against a real S3-compatible server on 127.0.0.1 (moto's server, credentials checked)."""

from __future__ import annotations

import http.server
import json
import logging
import math
import re
import threading
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from jobs.storage import UPLOAD_FAILED, DeliveryError, S3Storage, deliver

KEY_PATTERN = re.compile(r"^vibevoice/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.mp3$")


def test_presigned_url_downloads_exactly_the_bytes(s3_server, make_settings) -> None:
    settings = make_settings(**s3_server.settings_overrides(s3_presign_expiry=900))
    storage = S3Storage(settings)
    data = b"ID3" + bytes(range(256)) * 40
    delivery = deliver(data, "audio/mpeg", "mp3", "auto", storage, settings.inline_limit_bytes)
    assert delivery.method == "url" and not delivery.warnings
    url = delivery.fields["audio_url"]
    assert KEY_PATTERN.match(delivery.fields["object_key"])
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["900"]
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=delivery.fields["object_key"])
    assert head["ContentType"] == "audio/mpeg"


def test_keys_are_unguessable_and_unique(s3_server, make_settings) -> None:
    storage = S3Storage(make_settings(**s3_server.settings_overrides()))
    keys = {storage.new_key("wav") for _ in range(200)}
    assert len(keys) == 200


# Each fault: the settings that cause it, and the cause the worker's log names (the job says only
# that storage failed: S3's messages quote the endpoint, bucket and key).
FAULTS = {
    "unreachable endpoint": ({"s3_endpoint_url": "http://127.0.0.1:9", "s3_max_attempts": 2, "s3_timeout": 2},
                             "EndpointConnectionError"),
    "wrong credentials": ({"s3_secret_access_key": "not-the-secret"}, "SignatureDoesNotMatch"),
    "unknown key id": ({"s3_access_key_id": "AKIANOTAKEY0000000"}, "InvalidAccessKeyId"),
    "missing bucket": ({"s3_bucket_name": "no-such-bucket"}, "NoSuchBucket"),
}  # fmt: skip


@pytest.mark.fault
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faults_fall_back_to_base64_with_a_warning(s3_strict_server, make_settings, fault: str, caplog) -> None:
    overrides, cause = FAULTS[fault]
    settings = make_settings(**s3_strict_server.settings_overrides(**overrides))
    with caplog.at_level(logging.WARNING, logger="vibevoice.storage"):
        delivery = deliver(b"small result", "audio/mpeg", "mp3", "auto", S3Storage(settings), 1000)
    assert delivery.method == "base64"
    assert delivery.fields == {"audio_base64": "c21hbGwgcmVzdWx0"}
    assert delivery.warnings == [f"{UPLOAD_FAILED.rstrip('.')}; the audio is returned as base64 instead."]
    assert cause in caplog.text  # the operator finds the cause in the log


@pytest.mark.fault
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faults_fail_when_url_asked_or_result_too_big(s3_strict_server, make_settings, fault: str) -> None:
    overrides, _ = FAULTS[fault]
    settings = make_settings(**s3_strict_server.settings_overrides(**overrides))
    storage = S3Storage(settings)
    with pytest.raises(DeliveryError, match=re.escape(UPLOAD_FAILED)):
        deliver(b"small result", "audio/mpeg", "mp3", "url", storage, 1000)
    with pytest.raises(DeliveryError, match=re.escape(UPLOAD_FAILED)):
        deliver(b"x" * 2000, "audio/mpeg", "mp3", "auto", storage, 1000)


@pytest.mark.fault
def test_no_endpoint_bucket_key_or_secret_in_what_the_job_says(s3_strict_server, make_settings) -> None:
    """S3's messages quote the endpoint, the bucket and the key: none of it reaches the job's error or
    warning, whatever fails."""
    overrides = s3_strict_server.settings_overrides(
        s3_bucket_name="private-bucket-name", s3_secret_access_key="very-secret-value-123"
    )
    storage = S3Storage(make_settings(**overrides))
    with pytest.raises(DeliveryError) as error:
        deliver(b"x", "audio/mpeg", "mp3", "url", storage, 1000)
    fallback = deliver(b"x", "audio/mpeg", "mp3", "auto", storage, 1000)
    said = str(error.value) + " ".join(fallback.warnings)
    port = s3_strict_server.endpoint.rsplit(":", 1)[1]
    for private in ("private-bucket-name", "very-secret-value-123", s3_strict_server.access_key_id, port, "vibevoice/"):
        assert private not in said


class _TricklingS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request one byte every half second (under S3_TIMEOUT)."""

    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        reply = b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: "x"\r\n\r\n'
        for byte in reply:
            if self.server.stop.wait(0.5):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.fault
def test_an_upload_ends_at_its_deadline_however_slowly_s3_answers(make_settings) -> None:
    """botocore's read timeout is per socket read: an endpoint that sends a byte every half second
    never trips a 1 s timeout. S3_UPLOAD_DEADLINE ends the upload anyway (2 s here), and the
    result goes out by the delivery rules."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TricklingS3)
    server.daemon_threads, server.stop = True, threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = make_settings(
            s3_endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", s3_access_key_id="AKIAEXAMPLE",
            s3_secret_access_key="secret", s3_bucket_name="bucket", s3_timeout=1, s3_max_attempts=1,
            s3_upload_deadline=2,
        )  # fmt: skip
        delivery = deliver(b"small result", "audio/mpeg", "mp3", "auto", S3Storage(settings), 1000)
        # The complete answer takes 25 s and says 200: only the deadline makes this a fallback.
        assert delivery.method == "base64" and delivery.warnings[0].startswith(UPLOAD_FAILED.rstrip("."))
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()


def test_without_s3(make_settings) -> None:
    settings = make_settings()
    assert deliver(b"abc", "audio/wav", "wav", "auto", None, 1000).method == "base64"
    with pytest.raises(DeliveryError, match="return 'url' needs S3, but S3 is not configured"):
        deliver(b"abc", "audio/wav", "wav", "url", None, 1000)
    with pytest.raises(DeliveryError, match=r"over the 0.0 MB limit for base64 results; configure S3"):
        deliver(b"x" * 2000, "audio/wav", "wav", "base64", None, 1000)
    assert settings.inline_limit_bytes == 9_000_000


def test_the_documented_lifecycle_rule_is_valid_and_outlives_the_urls(s3_server, make_settings) -> None:
    """docs/operations.md's rule for results: S3 (moto's server) takes it as written, it covers the
    default key prefix, and its expiry is the presigned URL's life plus a day, in S3's whole days."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = docs.split("### Results in S3", 1)[1]
    rule = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    client = s3_server.client()
    client.put_bucket_lifecycle_configuration(Bucket=s3_server.bucket, LifecycleConfiguration=rule)
    (stored,) = client.get_bucket_lifecycle_configuration(Bucket=s3_server.bucket)["Rules"]
    settings = make_settings()
    assert stored["Filter"]["Prefix"] == settings.s3_key_prefix and stored["Status"] == "Enabled"
    assert stored["Expiration"]["Days"] == math.ceil(settings.s3_presign_expiry / 86400) + 1
