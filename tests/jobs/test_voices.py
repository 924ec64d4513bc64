"""Voice presets and cloning sources: lookup, limits, and safe URL fetching (local HTTP server)."""

from __future__ import annotations

import base64
import http.server
import ipaddress
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
from audio_helpers import encode_file, tone

from jobs.voices import VoiceError, VoiceLibrary, VoiceLimits, _destinations, _resolve_allowed
from runtime.deadline import Deadline


@pytest.fixture()
def limits(make_settings):
    """VoiceLimits from the settings (test server on loopback allowed, short timeout), with overrides."""

    def make(**overrides: object) -> VoiceLimits:
        values = {"voice_url_allowed_networks": "127.0.0.0/8", "voice_fetch_timeout": 3, **overrides}
        return VoiceLimits.from_settings(make_settings(**values))

    return make


@pytest.fixture()
def library(tmp_path: Path, limits) -> VoiceLibrary:
    folder = tmp_path / "voices"
    folder.mkdir()
    soundfile.write(folder / "en-Alice_woman.wav", tone(220, 2.0), 24000)
    soundfile.write(folder / "Carter.flac", tone(140, 1.5, 44100), 44100)
    (folder / "notes.txt").write_text("not a voice")
    (tmp_path / "secret.wav").write_bytes((folder / "Carter.flac").read_bytes())
    return VoiceLibrary(folder, limits())


def test_presets_by_stem_or_short_name_any_case(library: VoiceLibrary) -> None:
    assert library.names() == ["Carter", "en-Alice_woman"]
    assert library.find("alice").name == "en-Alice_woman"
    assert library.find("EN-ALICE_WOMAN").name == "en-Alice_woman"
    samples = library.load("carter")
    assert samples.dtype == np.float32 and abs(samples.size / 24000 - 1.5) < 0.01


def test_unknown_voice_lists_the_available_ones(library: VoiceLibrary) -> None:
    with pytest.raises(VoiceError, match=r"unknown voice 'Bob'; available voices: Carter, en-Alice_woman\."):
        library.find("Bob")


@pytest.mark.parametrize("name", ["../secret", "../../etc/passwd", "/etc/passwd", "voices/../secret", "secret\x00.wav"])
def test_names_never_leave_the_voices_folder(library: VoiceLibrary, name: str) -> None:
    with pytest.raises(VoiceError, match="unknown voice"):
        library.load(name)


def test_describe_reads_headers_only(library: VoiceLibrary) -> None:
    described = {entry["name"]: entry for entry in library.describe()}
    assert described["Carter"]["sample_rate"] == 44100
    assert described["Carter"]["duration_sec"] == pytest.approx(1.5, abs=0.01)
    assert described["en-Alice_woman"]["short_name"] == "Alice"


@pytest.mark.fault
def test_corrupt_preset_is_a_clear_error(library: VoiceLibrary) -> None:
    (library.folder / "Broken.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(VoiceError, match="voice 'Broken' could not be read: the wav audio could not be decoded"):
        library.load("Broken")


def test_base64_clone_from_many_formats(library: VoiceLibrary) -> None:
    clip = encode_file(tone(300, 1.0, 48000), 48000, "ogg", "libopus")
    samples = library.from_base64(base64.b64encode(clip).decode(), "'speakers[0]' audio")
    assert abs(samples.size / 24000 - 1.0) < 0.05
    data_url = "data:audio/ogg;base64," + base64.b64encode(clip).decode()
    assert library.from_base64(data_url, "x").size == samples.size


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("%%%not-base64%%%", "is not valid base64"),
        (base64.b64encode(b"hello world, not audio").decode(), "format is not recognised"),
        (base64.b64encode(b"").decode(), "the audio is empty"),
    ],
)
def test_bad_base64_audio(library: VoiceLibrary, payload: str, fragment: str) -> None:
    with pytest.raises(VoiceError, match=fragment):
        library.from_base64(payload, "'voice_audio_base64'")


def test_reference_duration_limits(library: VoiceLibrary, limits) -> None:
    short = encode_file(tone(300, 0.3), 24000, "wav", "pcm_s16le")
    with pytest.raises(VoiceError, match=r"0.30 s long; reference audio must be at least 0.5 s"):
        library.from_base64(base64.b64encode(short).decode(), "'voice_audio_base64'")
    strict = VoiceLibrary(library.folder, limits(voice_max_seconds=2.0))
    long = encode_file(tone(300, 3.0), 24000, "wav", "pcm_s16le")
    with pytest.raises(VoiceError, match=r"is longer than 2 s of audio; reference audio may be at most 2 s\.$"):
        strict.from_base64(base64.b64encode(long).decode(), "'voice_audio_base64'")
    silent = encode_file(np.zeros(24000, np.float32), 24000, "wav", "pcm_s16le")
    with pytest.raises(VoiceError, match="is silent"):
        library.from_base64(base64.b64encode(silent).decode(), "'voice_audio_base64'")


def test_size_cap_on_base64(library: VoiceLibrary, limits) -> None:
    small = VoiceLibrary(library.folder, limits(voice_max_bytes=10_000))
    with pytest.raises(VoiceError, match="larger than"):
        small.from_base64("A" * 20_000, "'voice_audio_base64'")


def test_fetch_from_local_server(library: VoiceLibrary, http_files: tuple[str, Path]) -> None:
    base, folder = http_files
    (folder / "clip.mp3").write_bytes(encode_file(tone(250, 1.2, 22050), 22050, "mp3", "libmp3lame"))
    samples = library.from_url(f"{base}/clip.mp3", "'voice_url'")
    assert abs(samples.size / 24000 - 1.2) < 0.1


def test_private_addresses_are_refused_by_default(library: VoiceLibrary, limits, http_files: tuple[str, Path]) -> None:
    base, folder = http_files
    (folder / "clip.wav").write_bytes(encode_file(tone(250, 1.0), 24000, "wav", "pcm_s16le"))
    guarded = VoiceLibrary(library.folder, limits(voice_url_allowed_networks=""))
    for url in (
        f"{base}/clip.wav",  # 127.0.0.1
        "http://localhost:1/clip.wav",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.wav",
        "http://[::1]:1/x.wav",
        "http://[::ffff:127.0.0.1]:1/x.wav",
    ):
        with pytest.raises(VoiceError, match="private, loopback, link-local or reserved address"):
            guarded.from_url(url, "'voice_url'")


@pytest.mark.parametrize("url", ["ftp://example.com/a.wav", "file:///etc/passwd", "gopher://x", "not a url"])
def test_only_http_urls(library: VoiceLibrary, url: str) -> None:
    with pytest.raises(VoiceError, match=r"must be an http:// or https:// URL"):
        library.from_url(url, "'voice_url'")


class _Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect-private":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        if self.path == "/missing":
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.end_headers()
        if self.path == "/huge":
            for _ in range(200):
                self.wfile.write(b"\x00" * 65536)
            return
        self.wfile.write(b"RIFF")
        self.wfile.flush()
        threading.Event().wait(5)  # then stall

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def awkward_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.fault
def test_fetch_limits(library: VoiceLibrary, limits, awkward_server: str) -> None:
    quick = VoiceLibrary(library.folder, limits(voice_fetch_timeout=1.0, voice_max_bytes=1_000_000))
    with pytest.raises(VoiceError, match="timed out after 1 s"):
        quick.from_url(f"{awkward_server}/stall", "'voice_url'")
    with pytest.raises(VoiceError, match="larger than the 1 MB limit"):
        quick.from_url(f"{awkward_server}/huge", "'voice_url'")
    with pytest.raises(VoiceError, match=r"could not be fetched \(HTTP 404\)"):
        quick.from_url(f"{awkward_server}/missing", "'voice_url'")
    with pytest.raises(VoiceError, match="could not be fetched"):
        quick.from_url("http://127.0.0.1:9/closed.wav", "'voice_url'")


def test_redirect_to_private_address_is_refused(library: VoiceLibrary, awkward_server: str) -> None:
    # The first hop is allowed (loopback is listed for the test server); the redirect's target is
    # checked again and refused, since link-local is not listed.
    with pytest.raises(VoiceError, match="private, loopback"):
        library.from_url(f"{awkward_server}/redirect-private", "'voice_url'")


@pytest.mark.fault
@pytest.mark.parametrize("path", ["/body", "/headers"])
def test_a_server_that_trickles_cannot_stretch_the_deadline(
    library: VoiceLibrary, limits, trickle_server, path
) -> None:
    """One byte a second passes every per-read timeout; the download still ends at its deadline, and
    the connection is cut then (the server sees the hang-up long before its 90 bytes are out)."""
    quick = VoiceLibrary(library.folder, limits(voice_fetch_timeout=2.0))
    with pytest.raises(VoiceError, match="timed out after 2 s"):
        quick.from_url(trickle_server.base_url + path, "'voice_url'")
    assert trickle_server.wait_for_cuts(1) == [path]


# --- IPv6 addresses that carry an IPv4 address ------------------------------------------------------


def _int(v4: str) -> int:
    return int(ipaddress.IPv4Address(v4))


def _teredo(server: str, client: str) -> str:
    """Teredo (2001::/32): the server's IPv4 address as is, the client's inverted (RFC 4380)."""
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (_int(server) << 64) | (_int(client) ^ 0xFFFFFFFF)))


IPV6_FORMS = {
    "IPv4-mapped ::ffff:0:0/96": lambda v4: f"::ffff:{v4}",
    "SIIT ::ffff:0:0:0/96": lambda v4: f"::ffff:0:{v4}",
    "IPv4-compatible ::/96": lambda v4: f"::{v4}",
    "NAT64 64:ff9b::/96": lambda v4: f"64:ff9b::{v4}",
    "local NAT64 64:ff9b:1::/48": lambda v4: f"64:ff9b:1::{v4}",
    "6to4 2002::/16": lambda v4: str(
        ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(v4)) << 80) | 1)
    ),
    "Teredo client": lambda v4: _teredo("65.54.227.120", v4),
    "Teredo server": lambda v4: _teredo(v4, "93.184.216.34"),
}
CARRIED = {"metadata": "169.254.169.254", "loopback": "127.0.0.1", "private": "10.0.0.1"}


@pytest.mark.parametrize("target", sorted(CARRIED))
@pytest.mark.parametrize("form", sorted(IPV6_FORMS))
def test_ipv6_forms_that_carry_a_private_ipv4_address_are_refused(form: str, target: str) -> None:
    """Each form is unwrapped to the IPv4 address it reaches, which is checked like any other; the
    local-use NAT64 prefix, whose layout varies per network, is refused whole."""
    address = IPV6_FORMS[form](CARRIED[target])
    with Deadline(5) as deadline, pytest.raises(VoiceError, match="private, loopback, link-local or reserved"):
        _resolve_allowed(address, 80, "'voice_url'", (), deadline)
    # An operator who allows the IPv4 network allows it in every form that can be read back.
    allowed = (ipaddress.ip_network(f"{CARRIED[target]}/32"), ipaddress.ip_network("2001::/32"))
    with Deadline(5) as deadline:
        if form.startswith("local NAT64"):
            with pytest.raises(VoiceError, match="private, loopback"):
                _resolve_allowed(address, 80, "'voice_url'", allowed, deadline)
        else:
            assert _resolve_allowed(address, 80, "'voice_url'", allowed, deadline)


@pytest.mark.parametrize("form", sorted(set(IPV6_FORMS) - {"local NAT64 64:ff9b:1::/48"}))
def test_ipv6_forms_unwrap_to_the_ipv4_address_they_carry(form: str) -> None:
    address = ipaddress.IPv6Address(IPV6_FORMS[form]("169.254.169.254"))
    assert ipaddress.IPv4Address("169.254.169.254") in _destinations(address)


def test_an_ipv4_address_is_never_in_an_allowed_ipv6_network() -> None:
    """`ipaddress` compares integers alone: 10.0.0.1 "is in" ::/96. The versions must match."""
    with Deadline(5) as deadline, pytest.raises(VoiceError, match="private, loopback"):
        _resolve_allowed("10.0.0.1", 80, "'voice_url'", (ipaddress.ip_network("::/96"),), deadline)
