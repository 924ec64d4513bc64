"""Generated job inputs (hypothesis) through parsing and planning, with no model.

At least 5,000 inputs per run (tests/job_strategies.py): valid jobs, jobs with fields mutated in
every way a client can get them wrong, duplicate keys, and values that are no job at all. Each
must either plan or fail with the input error's one sentence naming a field; nothing else may be
raised. Each case's time is measured and the slowest is reported under the reliability line (no
timing assertion: these machines are shared); the work a case can cause is bounded by the limits.

Voice URLs never leave the machine: every host name resolves to a private address here, which the
worker refuses before it connects (as it would refuse a real one).
"""

from __future__ import annotations

import re
import reprlib
import socket

import pytest
from fuzzing import SEED, Timings, replay
from hypothesis import HealthCheck, given, seed, settings
from job_strategies import FIELDS, job_inputs

from jobs.planning import JobError, JobPlan, plan_job
from jobs.schema import InputError, parse_job_input
from jobs.voices import VoiceLibrary

EXAMPLES = 5000
NAMES = sorted({*FIELDS, "input", "speakers"}, key=len, reverse=True)
TRACEBACK = re.compile(r'Traceback|File "|, line \d+, in ')
SHOWN = reprlib.Repr()  # shallow and short: safe for inputs nested thousands deep
SHOWN.maxlevel, SHOWN.maxstring, SHOWN.maxother = 4, 80, 80


def outcome(raw: object, job_settings, library: VoiceLibrary) -> JobPlan | str:
    """The plan, or the error sentence; any other exception propagates (that is the failure)."""
    try:
        job = parse_job_input(raw, job_settings)
        if job.action == "list_voices":
            return "list_voices"
        return plan_job(job, job_settings, library)
    except (InputError, JobError) as error:
        return str(error)


def check_sentence(message: str, raw: object) -> None:
    shown = SHOWN.repr(raw)
    assert message.endswith(".") and "\n" not in message, f"{message!r} for {shown} ({replay()})"
    assert not TRACEBACK.search(message) and len(message) < 1000, f"{message!r} ({replay()})"
    named = message.startswith("Unknown field '") or any(f"'{name}" in message for name in NAMES)
    assert named, f"names no field: {message!r} for {shown} ({replay()})"


@pytest.fixture()
def no_network(monkeypatch):
    """Every host name resolves to 10.0.0.1 (private: refused before any connection)."""

    def private(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port or 80))]

    monkeypatch.setattr(socket, "getaddrinfo", private)


def test_generated_job_inputs_plan_or_fail_with_one_sentence(make_settings, no_network, reliability) -> None:
    job_settings = make_settings()
    library = VoiceLibrary.for_settings(job_settings)
    timings = Timings("generated job inputs (parse + plan)")
    counts = {"planned": 0, "refused": 0}

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(job_inputs())
    def plans_or_fails_with_one_sentence(raw: object) -> None:
        with timings.measure(SHOWN.repr(raw)[:160]):
            result = outcome(raw, job_settings, library)
        if isinstance(result, str):
            if result != "list_voices":
                check_sentence(result, raw)
                counts["refused"] += 1
        else:
            assert result.chunks and len(result.chunks) <= job_settings.max_chunks
            counts["planned"] += 1

    plans_or_fails_with_one_sentence()
    tried = len(timings.times)
    assert tried >= EXAMPLES, tried
    assert counts["planned"] > EXAMPLES // 20 and counts["refused"] > EXAMPLES // 5, counts
    reliability.record("generated_jobs", tried)
    reliability.note(timings.summary() + f" [{counts['planned']} planned, {counts['refused']} refused]")
