"""Audio in and out.

untrusted.py   reference clips from callers, decoded within limits
dsp.py         resampling, speed, loudness and true peak
formats.py     the output formats (one table) and the encoder each one uses
encoders.py    the encoders, piece by piece
mp3.py         LAME through ctypes and the tag that makes a whole file gapless
"""
