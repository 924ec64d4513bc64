"""`make bench`: speed, memory and start-up figures, each a ratio against a baseline measured in the same run."""
