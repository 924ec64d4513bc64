"""The decode engine: every running job's chunks decoded together on one model.

    scheduler.py   DecodeScheduler: one per process, admits sequences into one batch, frame by frame
    decoder.py     BatchDecoder: the eager decode loop as steps (prefill, join, step, drop, park)
    framestep.py   FrameStep: the same frame as a static-shape step over preallocated slots (COMPILE)
    batch.py       the data types the loop and the static step share (requests, rows, frames)
    warmup.py      the start-up check: compile, compare each fast path with the plain one, fall back or fail
    fitness.py     one comparison: the same forced frames through a fast path and the plain one
    toolchain.py   the C compiler and Python headers torch.compile needs at run time

inference.py (at the root) loads the model and is the engine's face to the jobs.
"""
