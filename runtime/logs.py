"""Logging for the worker: one line format on stdout, with every known secret replaced by '***'."""

from __future__ import annotations

import logging
import sys

from config import Settings


class RedactSecrets(logging.Filter):
    """Replaces every known secret in log records with '***'."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
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
