"""Logging for the worker: one line format on stdout, with secrets and signed URLs redacted.

Every record is scrubbed whole: its message, a traceback it carries and its stack. Known secrets
become '***', and so does the query string of every URL, which is where presigned S3 URLs and the
bridge's signed clip URLs carry their credentials (`X-Amz-Credential`, `X-Amz-Signature`,
`signature`). The RunPod SDK logs by printing, past this filter: `quiet_runpod_sdk` keeps it from
printing job outputs.
"""

from __future__ import annotations

import logging
import re
import sys

from config import Settings

# A URL's query string, up to whitespace or a quote: presigned and signed URLs hold their keys there.
_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s'\"<>]*")
# The RunPod SDK's levels that print every job's output (NOTSET prints nothing at all).
_PRINTS_OUTPUTS = ("TRACE", "DEBUG")


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret and every URL query string replaced by '***'."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return _QUERY.sub(r"\1?***", text) if "://" in text else text


class RedactSecrets(logging.Filter):
    """Scrubs each record's message, traceback and stack (see the module docstring)."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Formatted here, so the handler's formatter uses this text instead of its own.
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def setup_logging(settings: Settings) -> None:
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    stream.addFilter(RedactSecrets(settings.secret_values()))
    root = logging.getLogger()
    root.handlers[:] = [stream]
    root.setLevel(settings.log_level)
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_runpod_sdk() -> None:
    """Keep the RunPod SDK's own logger at INFO or above.

    The SDK prints its log lines (past the filter above), and at DEBUG, its default, every job's
    output goes with them: the audio, presigned URLs, word timings. RUNPOD_LOG_LEVEL (or
    RUNPOD_DEBUG_LEVEL) may still ask for less."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    logger = RunPodLogger()
    if logger.level in _PRINTS_OUTPUTS:
        logging.getLogger("vibevoice.logs").info(
            "the RunPod SDK's log level %s would print job outputs; it is kept at INFO", logger.level
        )
        logger.level = "INFO"  # what set_level does, without its own log line
