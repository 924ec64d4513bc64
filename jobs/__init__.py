"""A job's path through the worker, in order:

schema.py      the job contract (JobInput), defaults filled in, one-sentence errors
planning.py    a validated job into chunks, reference voices and generation parameters
voices.py      presets and cloned voices (base64, URL) within limits
rendering.py   the decoded chunks into one file, or piece by piece for a stream
streaming.py   a streamed job's generation thread and its bounded queue
timeline.py    where chunks, pauses and words lie in the delivered audio
storage.py     delivery: S3 presigned URL or base64
reporting.py   the job's result and its progress updates
"""
