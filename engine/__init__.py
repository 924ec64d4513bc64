"""The decode engine: every running job's chunks decoded together on one model.

    scheduler.py   DecodeScheduler: one per process, admits sequences into one batch, frame by frame
    decoder.py     BatchDecoder: the eager decode loop as steps (prefill, join, step, drop, park)
    framestep.py   FrameStep: the same frame as a static-shape step over preallocated slots (COMPILE)
    batch.py       the data types the loop and the static step share (requests, rows, frames)

inference.py (at the root) loads the model and is the engine's face to the jobs.
"""
