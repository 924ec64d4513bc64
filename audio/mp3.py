"""MP3: LAME called directly, and the Xing/Info + LAME tag frame that makes a whole file gapless.

LAME is the library the `lameenc` wheel ships (built with its optimisations on, about 2.5x faster
than the LAME inside PyAV's FFmpeg). Its Python API takes 16-bit input and cannot set the output
rate, and LAME left to itself resamples low bitrates (mp3 at 24 kHz and 32 kbit/s would come out at
22.05 kHz), so the library's own C API is called through ctypes with FFmpeg's settings: float input
scaled to 16-bit range, the output rate fixed, constant bitrate, quality 3 (LAME's default, which
FFmpeg keeps), the bit reservoir on, no tag of LAME's own.

A whole file starts with an Info frame (a silent frame decoders skip) that holds the frame count,
the byte count and a seek table (Xing/Info), and the LAME tag: encoder delay and end padding, so
decoders trim the encoder's priming and the last frame's padding and give back exactly the samples
that went in (FFmpeg, mpg123, browsers), plus the music CRC and the tag's own CRC. LAME writes this
frame only when it fits in a frame of the stream's bitrate (not below 56 kbit/s at 24 kHz); here,
as FFmpeg's muxer does, the frame takes the smallest bitrate that holds it.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import cache

import numpy as np

SAMPLES_PER_FRAME = {1: 1152, 2: 576}  # MPEG-1 / MPEG-2 and 2.5, layer III
BITRATES_KBPS = {  # layer III, by bitrate index
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
VERSION_BITS = {0b11: 1, 0b10: 2, 0b00: 2}  # header version bits -> MPEG-1 or the lower-rate tables
RATES = {0b11: (44100, 48000, 32000), 0b10: (22050, 24000, 16000), 0b00: (11025, 12000, 8000)}
MONO_SIDE_INFO = {1: 17, 2: 9}  # bytes after the 4-byte header (the Xing tag starts there)
LAME_QUALITY = 3  # LAME's default algorithm quality (0 best .. 9 fastest); FFmpeg leaves it so
XING_FLAGS = 0x0F  # frames, bytes, seek table (TOC), quality field present
TAG_BYTES = 4 + 4 + 4 + 4 + 100 + 4 + 34 + 2  # "Info", flags, frames, bytes, TOC, quality, LAME tag, its CRC
DECODER_DELAY = 529  # samples a decoder adds in front (FFmpeg's demuxer skips delay + 529)


@dataclass(frozen=True)
class FrameHeader:
    """The fields of a layer III frame header this module needs."""

    version_bits: int
    bitrate_index: int
    rate_index: int
    padding: int

    @classmethod
    def parse(cls, data: bytes | memoryview, offset: int = 0) -> FrameHeader:
        b0, b1, b2 = data[offset], data[offset + 1], data[offset + 2]
        if b0 != 0xFF or b1 & 0xE0 != 0xE0 or (b1 >> 1) & 3 != 0b01 or (b1 >> 3) & 3 == 0b01:
            raise ValueError(f"no MPEG layer III frame header at byte {offset}")
        return cls((b1 >> 3) & 3, b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1)

    @property
    def mpeg(self) -> int:
        return VERSION_BITS[self.version_bits]

    @property
    def sample_rate(self) -> int:
        return RATES[self.version_bits][self.rate_index]

    @property
    def size(self) -> int:
        kbps = BITRATES_KBPS[self.mpeg][self.bitrate_index]
        return (144 if self.mpeg == 1 else 72) * 1000 * kbps // self.sample_rate + self.padding


def frame_offsets(data: bytes) -> list[int]:
    """Where each frame of a headerless stream of layer III frames starts (LAME's output)."""
    offsets, position = [], 0
    while position < len(data):
        offsets.append(position)
        position += FrameHeader.parse(data, position).size
    if position != len(data):
        raise ValueError("the MP3 stream ends inside a frame")
    return offsets


# --- CRC-16 (polynomial 0x8005, reflected: FFmpeg's AV_CRC_16_ANSI_LE, LAME's tag CRCs) ---------


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes, crc: int = 0) -> int:
    """CRC-16/ARC in Python: for the tag's own 190 bytes or less (the music CRC is LAME's, in C)."""
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


# --- LAME through ctypes ----------------------------------------------------------------------


@cache
def lame_library() -> ctypes.CDLL:
    """LAME's C API, from the library the lameenc wheel ships (its symbols are exported)."""
    import lameenc

    lib = ctypes.CDLL(lameenc.__file__)
    handle, c_int, c_float_p, c_bytes = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_char_p
    signatures = {
        "lame_init": ([], handle),
        "lame_close": ([handle], c_int),
        "lame_init_params": ([handle], c_int),
        "lame_set_num_channels": ([handle, c_int], c_int),
        "lame_set_mode": ([handle, c_int], c_int),
        "lame_set_in_samplerate": ([handle, c_int], c_int),
        "lame_set_out_samplerate": ([handle, c_int], c_int),
        "lame_set_brate": ([handle, c_int], c_int),
        "lame_set_quality": ([handle, c_int], c_int),
        "lame_set_bWriteVbrTag": ([handle, c_int], c_int),
        "lame_set_disable_reservoir": ([handle, c_int], c_int),
        "lame_get_encoder_delay": ([handle], c_int),
        "lame_get_lowpassfreq": ([handle], c_int),
        "lame_get_brate": ([handle], c_int),
        "lame_encode_buffer_float": ([handle, c_float_p, c_float_p, c_int, c_bytes, c_int], c_int),
        "lame_encode_flush": ([handle, c_bytes, c_int], c_int),
        "get_lame_very_short_version": ([], c_bytes),
        "UpdateMusicCRC": ([ctypes.POINTER(ctypes.c_uint16), c_bytes, c_int], None),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


MONO = 3  # LAME's MPEG_mode for one channel


class LameStream:
    """One LAME encoder: float samples in, MP3 frames out (no tag frame; see `info_frame`)."""

    def __init__(self, sample_rate: int, bitrate_kbps: int):
        self.lib = lame_library()
        self.handle = self.lib.lame_init()
        if not self.handle:
            raise MemoryError("LAME could not allocate an encoder")
        settings = (
            (self.lib.lame_set_num_channels, 1),
            (self.lib.lame_set_mode, MONO),
            (self.lib.lame_set_in_samplerate, sample_rate),
            (self.lib.lame_set_out_samplerate, sample_rate),
            (self.lib.lame_set_brate, bitrate_kbps),
            (self.lib.lame_set_quality, LAME_QUALITY),
            (self.lib.lame_set_bWriteVbrTag, 0),
            (self.lib.lame_set_disable_reservoir, 0),
        )
        for setter, value in settings:
            if setter(self.handle, value) < 0:
                self.close()
                raise ValueError(f"LAME refused {setter.__name__[9:]} = {value}")
        if self.lib.lame_init_params(self.handle) < 0:
            self.close()
            raise ValueError(f"LAME cannot encode mono at {sample_rate} Hz and {bitrate_kbps} kbit/s")
        self.delay = self.lib.lame_get_encoder_delay(self.handle)
        self.lowpass_hz = self.lib.lame_get_lowpassfreq(self.handle)
        self.samples = 0
        self._buffer = ctypes.create_string_buffer(7200)

    def encode(self, samples: np.ndarray) -> bytes:
        # FFmpeg's libmp3lame wrapper scales float samples to 16-bit range for lame_encode_buffer_float.
        scaled = np.ascontiguousarray(samples, dtype=np.float32) * np.float32(32768.0)
        needed = scaled.size + scaled.size // 4 + 7200  # LAME's worst case for one call
        if len(self._buffer) < needed:
            self._buffer = ctypes.create_string_buffer(needed)
        pointer = scaled.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        buffer = self._buffer
        size = self.lib.lame_encode_buffer_float(self.handle, pointer, None, scaled.size, buffer, len(buffer))
        if size < 0:
            raise RuntimeError(f"LAME failed to encode (error {size})")
        self.samples += scaled.size
        return self._buffer.raw[:size]

    def flush(self) -> bytes:
        """The last frames: what LAME still holds, padded to a whole frame."""
        size = self.lib.lame_encode_flush(self.handle, self._buffer, len(self._buffer))
        if size < 0:
            raise RuntimeError(f"LAME failed to flush (error {size})")
        return self._buffer.raw[:size]

    def close(self) -> None:
        if self.handle:
            self.lib.lame_close(self.handle)
            self.handle = None

    def __del__(self) -> None:
        self.close()


def music_crc(data: bytes) -> int:
    """The LAME tag's music CRC (CRC-16 of the audio frames), computed by LAME's own routine."""
    crc = ctypes.c_uint16(0)
    lame_library().UpdateMusicCRC(ctypes.byref(crc), data, len(data))
    return crc.value


# --- the Info frame ---------------------------------------------------------------------------


def _tag_header(first: FrameHeader, data: bytes) -> tuple[bytes, int]:
    """The Info frame's 4 header bytes and its size: the stream's header at the smallest bitrate
    index (from the stream's own up) whose frame holds the tag, without padding."""
    side_info = MONO_SIDE_INFO[first.mpeg]
    for index in range(first.bitrate_index, 15):
        header = FrameHeader(first.version_bits, index, first.rate_index, padding=0)
        if header.size >= 4 + side_info + TAG_BYTES:
            raw = bytearray(data[:4])
            raw[2] = (index << 4) | (raw[2] & 0x0D)  # new bitrate index, padding bit cleared
            return bytes(raw), header.size
    raise ValueError("no MP3 frame is large enough for the Info tag")  # not reached: 160 kbit/s always fits


def _seek_table(offsets: list[int], tag_size: int, total: int) -> bytes:
    """Xing TOC: for each percent of the duration, the byte position (in 1/256 of the file) of its frame."""
    frames = len(offsets)
    table = bytearray(100)
    for percent in range(1, 100):
        position = tag_size + offsets[percent * frames // 100]
        table[percent] = min(255, 256 * position // total)
    return bytes(table)


def info_frame(frames: bytes, samples: int, stream: LameStream) -> bytes:
    """The Xing/Info + LAME tag frame for a whole file of `samples` input samples encoded as `frames`."""
    offsets = frame_offsets(frames)
    first = FrameHeader.parse(frames)
    header, size = _tag_header(first, frames)
    total = size + len(frames)
    padding = len(offsets) * SAMPLES_PER_FRAME[first.mpeg] - stream.delay - samples
    if not 0 <= stream.delay < 4096 or not 0 <= padding < 4096:
        raise ValueError(f"encoder delay {stream.delay} or padding {padding} does not fit the LAME tag")
    version = stream.lib.get_lame_very_short_version()[:9].ljust(9, b"\0")
    kbps = BITRATES_KBPS[first.mpeg][first.bitrate_index]
    tag = b"".join(
        [
            b"Info",
            struct.pack(">III", XING_FLAGS, len(offsets), total),
            _seek_table(offsets, size, total),
            struct.pack(">I", 0),  # quality: unused for constant bitrate
            version,
            bytes([0x01, min(255, round(stream.lowpass_hz / 100))]),  # tag revision 0 + CBR; lowpass in 100 Hz
            bytes(8),  # ReplayGain peak and gains: not measured here (loudness is normalised instead)
            bytes([0, min(255, kbps)]),  # encoding flags + ATH type; the constant bitrate
            (stream.delay << 12 | padding).to_bytes(3, "big"),
            bytes(4),  # misc, MP3 gain, preset and surround
            struct.pack(">IH", total, music_crc(frames)),
        ]
    )
    frame = header + bytes(MONO_SIDE_INFO[first.mpeg]) + tag
    frame += struct.pack(">H", crc16(frame))  # the tag CRC covers everything before it
    return frame + bytes(size - len(frame))
