"""MP3 through LAME directly (audio/mp3.py): gapless whole files, a tag FFmpeg reads back, FFmpeg's audio.

The reference for the audio is FFmpeg's own libmp3lame (PyAV's build, the encoder used before) with
the same settings; the reference for the tag is FFmpeg's mp3 demuxer and the LAME tag layout.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest
from audio_helpers import probe

from audio import dsp, encoders, formats, mp3
from audio.formats import FORMATS
from tools.local_home import synthetic_voice

SPEECH = np.concatenate([synthetic_voice(210.0, 1, seconds=2.0), synthetic_voice(115.0, 2, seconds=2.0)])


def speech(rate: int) -> np.ndarray:
    return dsp.resample(SPEECH, 24000, rate)


def lag(reference: np.ndarray, decoded: np.ndarray, reach: int = 1200) -> int:
    """How many samples `decoded` is late against `reference` (cross-correlation peak)."""
    middle = reference[reach : reference.size - reach]
    scores = [np.dot(middle, decoded[reach + shift : reach + shift + middle.size]) for shift in range(-reach, reach)]
    return int(np.argmax(scores)) - reach


def snr_db(reference: np.ndarray, decoded: np.ndarray) -> float:
    error = np.sum((reference - decoded) ** 2)
    return float(10 * np.log10(np.sum(reference**2) / error)) if error else float("inf")


def ffmpeg_lame(samples: np.ndarray, rate: int, kbps: int) -> bytes:
    """The encoder used before: FFmpeg's libmp3lame and mp3 muxer through PyAV."""
    encoder = encoders.FFmpegEncoder(FORMATS["mp3"], rate, kbps, streaming=False)
    return encoder.write(samples) + encoder.close()


# Each MPEG version, the default, bitrates whose frames are too small for the tag (the tag frame takes
# a larger bitrate) and those where LAME alone would resample (it picks its own output rate there).
CASES = [(24000, 128), (24000, 32), (24000, 8), (48000, 128), (44100, 320), (22050, 64), (16000, 24), (8000, 8)]


@pytest.mark.parametrize(("rate", "kbps"), CASES)
def test_whole_file_decodes_to_exactly_the_input_samples(rate: int, kbps: int) -> None:
    signal = speech(rate)
    data = formats.encode(signal, "mp3", rate, kbps)
    decoded = probe(data)
    assert (decoded.sample_rate, decoded.channels) == (rate, 1)
    assert decoded.samples.size == signal.size  # priming and padding trimmed by the decoder
    assert lag(signal, decoded.samples) == 0
    assert snr_db(signal, decoded.samples) > (3 if kbps <= 8 else 10)


@pytest.mark.parametrize(("rate", "kbps"), [(24000, 128), (24000, 32), (48000, 64), (22050, 64), (8000, 8)])
def test_the_audio_is_what_ffmpegs_lame_gives(rate: int, kbps: int) -> None:
    """Same LAME settings as FFmpeg's libmp3lame, so the decoded audio matches the encoder used before."""
    signal = speech(rate)
    ours = probe(formats.encode(signal, "mp3", rate, kbps)).samples
    before = probe(ffmpeg_lame(signal, rate, kbps)).samples
    assert ours.size == before.size == signal.size
    assert snr_db(signal, ours) == pytest.approx(snr_db(signal, before), abs=0.1)
    # The two builds make the same decisions in most frames (often every frame): they are closer to
    # each other than either is to the input.
    assert snr_db(before, ours) > snr_db(signal, before) + 5
    assert len(formats.encode(signal, "mp3", rate, kbps)) <= len(ffmpeg_lame(signal, rate, kbps))  # no ID3 tag


def read_tag(data: bytes) -> dict:
    """The Info frame's fields, read by the layout of the LAME tag."""
    header = mp3.FrameHeader.parse(data)
    tag = 4 + mp3.MONO_SIDE_INFO[header.mpeg]
    assert data[tag : tag + 4] == b"Info"
    flags, frames, size = struct.unpack_from(">III", data, tag + 4)
    lame = tag + 16 + 100 + 4
    delay_padding = int.from_bytes(data[lame + 21 : lame + 24], "big")
    length, music_crc, tag_crc = struct.unpack_from(">IHH", data, lame + 28)
    return {
        "flags": flags, "frames": frames, "bytes": size, "toc": data[tag + 16 : tag + 116],
        "version": data[lame : lame + 9], "delay": delay_padding >> 12, "padding": delay_padding & 0xFFF,
        "length": length, "music_crc": music_crc, "tag_crc": tag_crc, "tag_crc_at": lame + 34,
        "frame_size": header.size,
    }  # fmt: skip


@pytest.mark.parametrize(("rate", "kbps"), [(24000, 128), (24000, 32), (48000, 128)])
def test_the_info_tag_holds_what_the_lame_tag_layout_asks(rate: int, kbps: int) -> None:
    signal = speech(rate)
    data = formats.encode(signal, "mp3", rate, kbps)
    tag = read_tag(data)
    audio_frames = data[tag["frame_size"] :]
    offsets = mp3.frame_offsets(audio_frames)
    spf = mp3.SAMPLES_PER_FRAME[mp3.FrameHeader.parse(data).mpeg]
    assert tag["flags"] == 0x0F and tag["version"].startswith(b"LAME")
    assert tag["frames"] == len(offsets)  # audio frames, the Info frame not counted
    assert tag["bytes"] == tag["length"] == len(data)
    assert tag["delay"] == 576 and tag["frames"] * spf == tag["delay"] + signal.size + tag["padding"]
    assert tag["music_crc"] == mp3.crc16(audio_frames)  # LAME's routine agrees with a plain CRC-16
    assert tag["tag_crc"] == mp3.crc16(data[: tag["tag_crc_at"]])
    toc = list(tag["toc"])
    assert toc[0] == 0 and toc == sorted(toc) and 200 < toc[-1] <= 255
    # The tag frame is a valid frame of the stream's kind: same version, rate and mode.
    first = mp3.FrameHeader.parse(audio_frames)
    assert (mp3.FrameHeader.parse(data).version_bits, mp3.FrameHeader.parse(data).rate_index) == (
        first.version_bits,
        first.rate_index,
    )
    assert data[3] >> 6 == audio_frames[3] >> 6 == 0b11  # mono


def test_ffmpeg_reads_the_tag_back() -> None:
    """FFmpeg's mp3 demuxer accepts the tag (it keeps the encoder name only when the tag CRC is right)
    and takes the duration and the trimming from it."""
    signal = speech(24000)
    data = formats.encode(signal, "mp3", 24000, 64)
    tag = read_tag(data)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert stream.metadata.get("encoder", "").startswith("LAME")
        assert stream.duration * stream.time_base == signal.size / 24000  # frames less delay and padding
        assert stream.start_time * stream.time_base == pytest.approx((576 + mp3.DECODER_DELAY) / 24000)
    damaged = bytearray(data)
    damaged[tag["tag_crc_at"] - 3] ^= 0xFF  # a byte of the music length: the tag CRC no longer holds
    with av.open(io.BytesIO(bytes(damaged))) as container:
        assert "encoder" not in container.streams.audio[0].metadata


def test_streamed_frames_are_the_whole_files_frames() -> None:
    """A stream has no tag frame (its frame count is known only at the end); its frames are the whole file's."""
    signal = speech(24000)
    whole = formats.encode(signal, "mp3", 24000, 128)
    encoder = formats.open_encoder("mp3", 24000, 128, streaming=True)
    pieces = [encoder.write(signal[i : i + 3200]) for i in range(0, signal.size, 3200)] + [encoder.close()]
    assert sum(1 for piece in pieces[:-1] if piece) > 5  # bytes leave as they are encoded
    assert b"".join(pieces) == whole[read_tag(whole)["frame_size"] :]
    decoded = probe(b"".join(pieces)).samples  # without the tag, decoders keep the priming in front
    assert decoded.size == read_tag(whole)["frames"] * 576
    assert lag(signal, decoded[576 + mp3.DECODER_DELAY :]) == 0  # 46 ms late, as FFmpeg's streamed mp3 was


@pytest.mark.parametrize("samples", [0, 1, 100, 575, 577, 1153])
def test_tiny_inputs_stay_gapless(samples: int) -> None:
    signal = speech(24000)[1000 : 1000 + samples]
    data = formats.encode(signal, "mp3", 24000, 128)
    tag = read_tag(data)
    assert tag["frames"] * 576 == tag["delay"] + samples + tag["padding"]
    if samples >= 100:  # FFmpeg's decoder does not trim its own 529-sample delay from shorter files
        assert probe(data).samples.size == samples


def test_lame_refuses_what_mp3_cannot_carry() -> None:
    with pytest.raises(ValueError, match="11111"):
        mp3.LameStream(11111, 128)
