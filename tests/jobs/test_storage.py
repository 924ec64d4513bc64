"""Delivery against a real S3-compatible server on 127.0.0.1 (moto's server, credentials checked)."""

from __future__ import annotations

import re
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest

from jobs.storage import DeliveryError, S3Storage, deliver

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


FAULTS = {
    "unreachable endpoint": ({"s3_endpoint_url": "http://127.0.0.1:9", "s3_max_attempts": 2, "s3_timeout": 2},
                             "S3 upload failed: EndpointConnectionError"),
    "wrong credentials": ({"s3_secret_access_key": "not-the-secret"}, "S3 upload failed: SignatureDoesNotMatch"),
    "unknown key id": ({"s3_access_key_id": "AKIANOTAKEY0000000"}, "S3 upload failed: InvalidAccessKeyId"),
    "missing bucket": ({"s3_bucket_name": "no-such-bucket"}, "S3 upload failed: NoSuchBucket"),
}  # fmt: skip


@pytest.mark.fault
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faults_fall_back_to_base64_with_a_warning(s3_strict_server, make_settings, fault: str) -> None:
    overrides, message = FAULTS[fault]
    settings = make_settings(**s3_strict_server.settings_overrides(**overrides))
    delivery = deliver(b"small result", "audio/mpeg", "mp3", "auto", S3Storage(settings), 1000)
    assert delivery.method == "base64"
    assert delivery.fields == {"audio_base64": "c21hbGwgcmVzdWx0"}
    assert delivery.warnings and delivery.warnings[0].startswith(message)
    assert "returned as base64 instead" in delivery.warnings[0]


@pytest.mark.fault
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faults_fail_when_url_asked_or_result_too_big(s3_strict_server, make_settings, fault: str) -> None:
    overrides, message = FAULTS[fault]
    settings = make_settings(**s3_strict_server.settings_overrides(**overrides))
    storage = S3Storage(settings)
    with pytest.raises(DeliveryError, match=re.escape(message)):
        deliver(b"small result", "audio/mpeg", "mp3", "url", storage, 1000)
    with pytest.raises(DeliveryError, match=re.escape(message)):
        deliver(b"x" * 2000, "audio/mpeg", "mp3", "auto", storage, 1000)


def test_secrets_never_in_messages(s3_strict_server, make_settings) -> None:
    settings = make_settings(**s3_strict_server.settings_overrides(s3_secret_access_key="very-secret-value-123"))
    with pytest.raises(DeliveryError) as error:
        deliver(b"x", "audio/mpeg", "mp3", "url", S3Storage(settings), 1000)
    assert "very-secret-value-123" not in str(error.value)
    assert s3_strict_server.access_key_id not in str(error.value)


def test_without_s3(make_settings) -> None:
    settings = make_settings()
    assert deliver(b"abc", "audio/wav", "wav", "auto", None, 1000).method == "base64"
    with pytest.raises(DeliveryError, match="return 'url' needs S3, but S3 is not configured"):
        deliver(b"abc", "audio/wav", "wav", "url", None, 1000)
    with pytest.raises(DeliveryError, match=r"over the 0.0 MB limit for base64 results; configure S3"):
        deliver(b"x" * 2000, "audio/wav", "wav", "base64", None, 1000)
    assert settings.inline_limit_bytes == 9_000_000
