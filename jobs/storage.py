"""Result delivery: S3 upload with a presigned URL, or inline base64, by the delivery rules.

- `return: "url"` needs S3 and fails loudly when the upload fails.
- `return: "base64"` inlines the audio when it fits under the inline limit, else fails.
- `return: "auto"` uploads when S3 is configured; when the upload fails after bounded retries or
  passes its deadline, it falls back to base64 only if the result fits the inline limit, and
  says so in a warning.
Nothing is ever written to a local folder and called delivered.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass, field

import boto3
import botocore.config
import botocore.exceptions

from config import Settings
from runtime.deadline import DeadlinePassed, call_within

log = logging.getLogger("vibevoice.storage")

# What a job says when S3 fails, whatever the cause; the cause is in the worker's log.
UPLOAD_FAILED = "the audio could not be uploaded to the endpoint's storage (S3; the cause is in the worker's log)."


class DeliveryError(RuntimeError):
    """The result could not be delivered; the message is one sentence for the user."""


@dataclass
class Delivery:
    method: str  # "url" or "base64"
    fields: dict
    warnings: list[str] = field(default_factory=list)
    upload_seconds: float = 0.0


class S3Storage:
    """Uploads to one bucket under unguessable keys and presigns GET URLs.

    An upload, all its attempts together, ends within `S3_UPLOAD_DEADLINE` seconds: botocore's own
    connect and read timeouts and its retries end an endpoint that stalls or refuses, and the
    upload runs in a helper thread that the job stops waiting for at the deadline, which also ends
    one that trickles bytes (runtime/deadline.py). What went wrong goes to the worker's log; the
    job's error or warning says only that storage failed, as S3's messages quote the endpoint,
    bucket and key."""

    def __init__(self, settings: Settings):
        self.bucket = settings.s3_bucket_name
        self.prefix = settings.s3_key_prefix
        self.expiry = settings.s3_presign_expiry
        self.deadline = settings.s3_upload_deadline
        timeout = min(settings.s3_timeout, settings.s3_upload_deadline)
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            aws_access_key_id=settings.s3_access_key_id.get_secret_value(),
            aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
            region_name=settings.s3_region,
            config=botocore.config.Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},  # works with R2, MinIO, B2 and AWS alike
                retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
                connect_timeout=timeout,
                read_timeout=timeout,
            ),
        )

    def new_key(self, extension: str) -> str:
        day = dt.datetime.now(dt.UTC).strftime("%Y/%m/%d")
        return f"{self.prefix}{day}/{uuid.uuid4().hex}.{extension}"

    def upload(self, data: bytes, content_type: str, extension: str) -> tuple[str, str]:
        """Upload and return (key, presigned GET URL). Raises DeliveryError with UPLOAD_FAILED."""
        key = self.new_key(extension)
        try:
            return call_within(self.deadline, lambda: self._put(key, data, content_type), name="s3-upload")
        except DeadlinePassed:
            log.warning("S3 upload of %s did not finish within S3_UPLOAD_DEADLINE (%g s)", key, self.deadline)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            log.warning("S3 upload of %s failed: %s (%s)", key, error.get("Code", "error"), error.get("Message"))
        except botocore.exceptions.BotoCoreError as exc:
            log.warning("S3 upload of %s failed: %s (%s)", key, type(exc).__name__, _first_line(exc))
        raise DeliveryError(UPLOAD_FAILED)

    def _put(self, key: str, data: bytes, content_type: str) -> tuple[str, str]:
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        url = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expiry
        )
        return key, url


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__


def inline(data: bytes, limit: int) -> dict:
    if len(data) > limit:
        raise DeliveryError(
            f"the encoded audio is {len(data) / 1e6:.1f} MB, over the {limit / 1e6:.1f} MB limit for base64 "
            "results; configure S3 and use return 'url' or 'auto', or ask for a shorter text or a smaller format."
        )
    return {"audio_base64": base64.b64encode(data).decode("ascii")}


def deliver(
    data: bytes,
    content_type: str,
    extension: str,
    mode: str,
    storage: S3Storage | None,
    inline_limit: int,
) -> Delivery:
    """Deliver encoded audio by the rules in the module docstring."""
    if mode == "base64":
        return Delivery("base64", inline(data, inline_limit))
    if storage is None:
        if mode == "url":
            raise DeliveryError("return 'url' needs S3, but S3 is not configured on this endpoint.")
        return Delivery("base64", inline(data, inline_limit))
    started = time.perf_counter()
    try:
        key, url = storage.upload(data, content_type, extension)
    except DeliveryError as exc:
        if mode == "url" or len(data) > inline_limit:
            raise
        delivery = Delivery("base64", inline(data, inline_limit), upload_seconds=time.perf_counter() - started)
        delivery.warnings.append(f"{str(exc).rstrip('.')}; the audio is returned as base64 instead.")
        return delivery
    return Delivery(
        "url",
        {"audio_url": url, "object_key": key, "url_expires_in": storage.expiry},
        upload_seconds=time.perf_counter() - started,
    )
