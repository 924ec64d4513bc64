"""Text and its timing in speech.

script.py      scripts (`Speaker N:` lines), sentences, chunks, the frame cap
pronounce.py   phones for words outside the aligner's dictionary
aligner.py     word timings by forced alignment, in background processes
captions.py    SRT and WebVTT
"""
