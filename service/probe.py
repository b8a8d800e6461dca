"""`probe_seconds`: how long an uploaded video lasts, measured in a decode worker (a job's progress total).

A module of its own with light imports: the decode pool sends the function by reference, so a worker
process imports only this and the decoder.
"""
from __future__ import annotations

import os

from training.video import DecodeLimits
from training.video.decode import probe


def probe_seconds(path: str, limits: DecodeLimits) -> float:
    """The duration in seconds of the video stored at `path`, under the decode `limits`.

    The file goes to FFmpeg as an open file object without a path-like name, as in
    `service.decode_pool.decode_file` (a name could make FFmpeg pick a demuxer that acts on it).
    Raises the decoder's `VideoDecodeError`s."""
    with open(os.open(path, os.O_RDONLY), "rb") as file:
        return float(probe(file, limits=limits).duration_s)
