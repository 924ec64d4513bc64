"""Reference voices: presets on the volume, and cloning sources sent with a job (base64 or URL).

A preset is an audio file in the voices folder (`demo/voices/`); its name is the file stem,
matched case-insensitively. VibeVoice's own files are named like `en-Alice_woman.wav`, so the
short name ("Alice") also matches when exactly one file carries it. Names are only ever compared
with the folder's listing, never joined into a path, so a name cannot reach outside the folder.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import numpy as np
import soundfile
import urllib3
import urllib3.connection

if TYPE_CHECKING:
    from config import Settings

from audio import dsp, untrusted
from runtime.deadline import Deadline, DeadlinePassed, call_within

AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".webm")
MODEL_RATE = 24000
_VIBEVOICE_NAME = re.compile(r"^[a-z]{2,3}-(?P<short>[^_]+)_", re.IGNORECASE)
_MAX_REDIRECTS = 3


class VoiceError(ValueError):
    """A voice is unknown or its audio unusable; the message is one sentence for the user."""


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path

    @property
    def short_name(self) -> str | None:
        match = _VIBEVOICE_NAME.match(self.name)
        return match.group("short") if match else None


@dataclass(frozen=True)
class VoiceLimits:
    """What one reference clip may cost; the values and their defaults live in config.Settings."""

    max_bytes: int
    min_seconds: float
    max_seconds: float
    max_total_seconds: float  # all reference clips of one job together
    fetch_timeout: float
    # Non-public networks a voice URL may still point to (e.g. 127.0.0.0/8 for tests).
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> VoiceLimits:
        return cls(
            max_bytes=settings.voice_max_bytes,
            min_seconds=settings.voice_min_seconds,
            max_seconds=settings.voice_max_seconds,
            max_total_seconds=settings.voice_max_total_seconds,
            fetch_timeout=settings.voice_fetch_timeout,
            allowed_networks=settings.voice_url_networks,
        )

    @property
    def max_base64_chars(self) -> int:
        """The longest base64 text (with a data-URL prefix and line breaks) that can hold `max_bytes`."""
        encoded = (self.max_bytes + 2) // 3 * 4
        return encoded + encoded // 64 * 2 + 256


class VoiceLibrary:
    """The presets in one folder, with decoded reference audio cached by file and mtime."""

    def __init__(self, folder: Path, limits: VoiceLimits):
        self.folder = folder
        self.limits = limits
        self._cache: dict[tuple[Path, int], np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> VoiceLibrary:
        """The deployment's voices folder with the deployment's limits."""
        return cls(settings.voices_dir, VoiceLimits.from_settings(settings))

    def presets(self) -> list[Preset]:
        if not self.folder.is_dir():
            return []
        files = [
            entry
            for entry in self.folder.iterdir()
            if entry.is_file() and entry.suffix.lower() in AUDIO_SUFFIXES and not entry.name.startswith(".")
        ]
        return sorted((Preset(entry.stem, entry) for entry in files), key=lambda preset: preset.name.lower())

    def names(self) -> list[str]:
        return [preset.name for preset in self.presets()]

    def has(self, name: str) -> bool:
        """Whether any preset answers to `name` (stem or VibeVoice short name, any case)."""
        wanted = name.strip().lower()
        return any(wanted in (preset.name.lower(), (preset.short_name or "").lower()) for preset in self.presets())

    def find(self, name: str) -> Preset:
        """The preset called `name` (stem or VibeVoice short name, any case), or a VoiceError."""
        wanted = name.strip().lower()
        presets = self.presets()
        exact = [preset for preset in presets if preset.name.lower() == wanted]
        if exact:
            return exact[0]
        short = [preset for preset in presets if (preset.short_name or "").lower() == wanted]
        if len(short) == 1:
            return short[0]
        available = ", ".join(preset.name for preset in presets) or "none (the voices folder is empty)"
        if len(short) > 1:
            raise VoiceError(
                f"voice {name!r} matches several presets ({', '.join(p.name for p in short)}); use the full name."
            )
        raise VoiceError(f"unknown voice {_shown(name)}; available voices: {available}.")

    def load(self, name: str) -> np.ndarray:
        """Reference audio of a preset as 24 kHz mono float32."""
        preset = self.find(name)
        try:
            key = (preset.path, preset.path.stat().st_mtime_ns)
        except OSError:
            raise VoiceError(f"voice {preset.name!r} can no longer be read from the voices folder.") from None
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        what = f"voice {preset.name!r}"
        try:  # the operator's own file: VOICE_MAX_BYTES is for clips sent with jobs, the duration limit holds
            samples = self._decode(preset.path.read_bytes(), what, None, preset=True)
        except OSError as exc:
            raise VoiceError(f"{what} could not be read: {_reason(exc)}") from None
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != preset.path}
            self._cache[key] = samples
        return samples

    def describe(self) -> list[dict]:
        """Name, duration and sample rate of every preset (headers only: no model, no decoding)."""
        described = []
        for preset in self.presets():
            entry: dict = {"name": preset.name, "duration_sec": None, "sample_rate": None}
            if preset.short_name:
                entry["short_name"] = preset.short_name
            try:
                info = soundfile.info(str(preset.path))
                entry["duration_sec"] = round(info.frames / info.samplerate, 3)
                entry["sample_rate"] = info.samplerate
            except (RuntimeError, OSError, soundfile.LibsndfileError):
                try:
                    samples = self.load(preset.name)
                    entry["duration_sec"] = round(samples.size / MODEL_RATE, 3)
                    entry["sample_rate"] = MODEL_RATE
                except VoiceError:
                    entry["error"] = "unreadable"
            described.append(entry)
        return described

    # --- cloning sources ------------------------------------------------------------------

    def from_base64(self, encoded: str, field: str, max_seconds: float | None = None) -> np.ndarray:
        """A clip sent as base64 (or a data: URL); its length is checked before anything is decoded."""
        limit = self.limits.max_bytes
        if len(encoded) > self.limits.max_base64_chars:
            raise VoiceError(f"{field} is larger than the {_megabytes(limit)} limit for reference audio.")
        compact = re.sub(r"\s+", "", encoded)
        if compact.startswith("data:"):  # a data URL: keep what follows "base64,"
            compact = compact.partition(",")[2]
        if len(compact) > (limit + 2) // 3 * 4:
            raise VoiceError(f"{field} is larger than the {_megabytes(limit)} limit for reference audio.")
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise VoiceError(f"{field} is not valid base64.") from None
        return self._decode(data, field, max_seconds)

    def from_url(self, url: str, field: str, max_seconds: float | None = None) -> np.ndarray:
        """A clip downloaded from an http(s) URL (streamed, stopped at the byte cap)."""
        return self._decode(fetch_audio(url, field, self.limits), field, max_seconds)

    def _decode(self, data: bytes, what: str, max_seconds: float | None, preset: bool = False) -> np.ndarray:
        """Bounded decoding: stops at `max_seconds` (the clip limit, or less when the job's budget is)."""
        if not preset and len(data) > self.limits.max_bytes:
            raise VoiceError(f"{what} is larger than the {_megabytes(self.limits.max_bytes)} limit.")
        limit = self.limits.max_seconds if max_seconds is None else min(max_seconds, self.limits.max_seconds)
        try:
            samples = untrusted.decode(data, MODEL_RATE, limit).samples
        except untrusted.TooLong:
            raise VoiceError(self.too_long(what, limit)) from None
        except dsp.AudioError as exc:
            raise VoiceError(f"{what}{' could not be read' if preset else ''}: {_reason(exc)}") from None
        seconds = samples.size / MODEL_RATE
        if seconds > limit:  # resampling rounds up by a sample or so; the clip itself was allowed
            samples = samples[: int(limit * MODEL_RATE)]
        if seconds < self.limits.min_seconds:
            raise VoiceError(
                f"{what} is {seconds:.2f} s long; reference audio must be at least {self.limits.min_seconds:g} s."
            )
        if not np.any(samples):
            raise VoiceError(f"{what} is silent.")
        return samples

    def too_long(self, what: str, limit: float) -> str:
        """The sentence for a clip past `limit`: the clip limit, or the job's budget when that is lower."""
        if limit < self.limits.max_seconds:
            total = self.limits.max_total_seconds
            return (
                f"{what} brings the job's reference audio past {total:g} s; "
                f"the voices of one job may hold at most {total:g} s together."
            )
        return f"{what} is longer than {limit:g} s of audio; reference audio may be at most {limit:g} s."


def fetch_audio(url: str, field: str, limits: VoiceLimits) -> bytes:
    """Download reference audio over http(s), within a wall-clock deadline and a size cap.

    Every hop (redirects included) is resolved once and checked: loopback, private, link-local,
    multicast, reserved and cloud metadata addresses, also when an IPv6 address carries them
    (`_destinations`), are refused unless their network is listed in `allowed_networks`, and the
    connection goes to the checked address (no second DNS lookup to rebind). `fetch_timeout` bounds
    the whole download, lookups, redirects and a server that trickles bytes included
    (runtime/deadline.py).
    """
    timed_out = f"{field} timed out after {limits.fetch_timeout:g} s."
    with Deadline(limits.fetch_timeout) as deadline:
        try:
            for _ in range(_MAX_REDIRECTS + 1):
                pool, response = _request(url, field, limits, deadline)
                try:
                    if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise VoiceError(f"{field} could not be fetched (HTTP {response.status}).")
                    return _read_capped(response, field, limits, deadline)
                finally:
                    response.release_conn()
                    pool.close()
        except DeadlinePassed:
            raise VoiceError(timed_out) from None
    raise VoiceError(f"{field} redirected more than {_MAX_REDIRECTS} times.")


class _Watched:
    """Mixed into a urllib3 connection: its socket the deadline's watchdog cuts when the time is up
    (for HTTPS too: the TLS socket wraps this one, so the cut reaches it)."""

    def __init__(self, *args, deadline: Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self.deadline.watch(sock)
        return sock


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def _request(url: str, field: str, limits: VoiceLimits, deadline: Deadline):
    """One GET to the checked address of `url`'s host; returns (pool, response), body unread."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise VoiceError(f"{field} must be an http:// or https:// URL.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _resolve_allowed(parts.hostname, port, field, limits.allowed_networks, deadline)
    remaining = deadline.read_timeout()
    timeout = urllib3.Timeout(connect=min(remaining, 5.0), read=remaining)
    common = {"port": port, "timeout": timeout, "retries": False, "maxsize": 1, "deadline": deadline}
    if parts.scheme == "https":
        pool = _WatchedHTTPSPool(address, server_hostname=parts.hostname, assert_hostname=parts.hostname, **common)
    else:
        pool = _WatchedHTTPPool(address, **common)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # The file as it is: a compressed response would be decompressed past the byte cap.
    headers = {"Host": parts.netloc.rpartition("@")[2], "User-Agent": "vibevoice-worker", "Accept-Encoding": "identity"}
    try:
        response = pool.urlopen(
            "GET", path, headers=headers, redirect=False, preload_content=False, decode_content=False
        )
    except urllib3.exceptions.HTTPError as exc:
        pool.close()
        if deadline.passed:
            raise DeadlinePassed from None
        raise VoiceError(f"{field} could not be fetched ({_network_reason(exc)}).") from None
    return pool, response


def _read_capped(response, field: str, limits: VoiceLimits, deadline: Deadline) -> bytes:
    """The body, stopped as soon as it passes the byte cap or the deadline.

    Each read takes what has arrived (`read1`) and waits at most the time left; a connection the
    watchdog cut ends the body early, which the deadline check after the loop tells from a real end."""
    too_large = f"{field} is larger than the {_megabytes(limits.max_bytes)} limit."
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise VoiceError(too_large)
    received = bytearray()
    try:
        while True:
            sock = getattr(response.connection, "sock", None)
            if sock is not None:
                sock.settimeout(deadline.read_timeout())
            piece = response.read1(64 * 1024)
            if not piece:
                break
            received += piece
            if len(received) > limits.max_bytes:
                raise VoiceError(too_large)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if deadline.passed or isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            raise DeadlinePassed from None
        raise VoiceError(f"{field} could not be fetched ({_network_reason(exc)}).") from None
    if deadline.passed:
        raise DeadlinePassed
    return bytes(received)


# IPv6 forms that carry an IPv4 address, which is where their packets end up: the IPv4-mapped,
# SIIT-translated and deprecated IPv4-compatible forms, and NAT64's well-known prefix (RFC 6052).
_CARRIERS = tuple(ipaddress.IPv6Network(net) for net in ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96"))
# Local-use NAT64 (RFC 8215): each network chooses where the IPv4 part sits, so it cannot be read back.
_UNREADABLE = (ipaddress.IPv6Network("64:ff9b:1::/48"),)
_UNSPECIFIED, _LOOPBACK = ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")


def _destinations(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The addresses a connection to `address` reaches: the IPv4 address an IPv6 form carries (in
    place of the IPv6 one), and for 6to4 and Teredo the IPv6 address with every IPv4 it embeds."""
    if address.version == 4:
        return [address]
    if any(address in net for net in _CARRIERS) and address not in (_UNSPECIFIED, _LOOPBACK):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    embedded = [address.sixtofour] if address.sixtofour else []
    embedded += list(address.teredo or ())  # (server, client), the client already de-obfuscated
    return [address, *embedded]


def _allowed(address, allowed_networks: tuple) -> bool:
    """Public, or in a listed network (an IPv4 address is never "in" an IPv6 network: the versions
    must match, as `ipaddress` compares the integers alone)."""
    if any(address.version == net.version and address in net for net in allowed_networks):
        return True
    return address.is_global and not any(address.version == 6 and address in net for net in _UNREADABLE)


def _resolve_allowed(host: str, port: int, field: str, allowed_networks: tuple, deadline: Deadline) -> str:
    try:
        infos = call_within(deadline.left(), lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except (socket.gaierror, UnicodeError):
        raise VoiceError(f"{field} names a host that cannot be resolved.") from None
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        destinations = _destinations(address)
        if not all(_allowed(destination, allowed_networks) for destination in destinations):
            raise VoiceError(
                f"{field} points to a private, loopback, link-local or reserved address, which is not allowed."
            )
        # An IPv4-mapped address is connected to as IPv4; other forms as given.
        addresses.append(destinations[0] if address.version == 6 and address.ipv4_mapped else address)
    if not addresses:
        raise VoiceError(f"{field} names a host that cannot be resolved.")
    return str(addresses[0])


def _network_reason(exc: Exception) -> str:
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "connection timed out"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "read timed out"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "connection refused or unreachable"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return "TLS error"
    return type(exc).__name__


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:g} MB"


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text if text.endswith(".") else text + "."


def _shown(name: str) -> str:
    """A user-given name, quoted and shortened, with control characters escaped."""
    shown = name if len(name) <= 60 else name[:57] + "..."
    return repr(shown)
