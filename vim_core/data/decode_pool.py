"""Decode a stream of images on several processes and hand them back in the order they were read.

prepare_data reads samples in one process (the source decides their order, and with it the shards' bytes)
and decodes and resizes them here. Chunks of CHUNK images go to a process pool, at most 2 chunks per
worker in flight, so memory stays bounded whatever the dataset's size; results come back chunk by chunk
in submission order, so the shards are byte-for-byte those of one worker. Already-decoded arrays (the
embedded MNIST) are fitted in place: sending them to another process costs more than the work.
"""

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice

import numpy as np

from vim_core.data.sources import Sample, decode_image

CHUNK = 64
IN_FLIGHT_PER_WORKER = 2

Decoded = tuple[np.ndarray | None, str | None]  # the image, or None and why it is unreadable


def resolve_workers(workers: int | str) -> int:
    """`auto`: the cores this process may run on."""
    if workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(workers)


def _decode_one(raw, channels: int, size: int, fit: str) -> Decoded:
    try:
        return decode_image(raw, channels, size, fit), None
    except ValueError as err:
        return None, str(err)


def _decode_chunk(raws: list, channels: int, size: int, fit: str) -> list[Decoded]:
    return [_decode_one(raw, channels, size, fit) for raw in raws]


def _done(value: list[Decoded]) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: no fork of a parent that may hold threads (Prefect's, MLflow's), and the server imports
    # only the decoder, not the stage's own __main__.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vim_core.data.decode_pool"])
    return ProcessPoolExecutor(workers, mp_context=context)


def decode_stream(
    samples: Iterable[Sample], channels: int, size: int, fit: str, workers: int
) -> Iterator[tuple[Sample, np.ndarray | None, str | None]]:
    """(sample, image, None) or (sample, None, reason) for every sample, in input order."""
    samples = iter(samples)
    if workers <= 1:
        for sample in samples:
            yield sample, *_decode_one(sample.raw, channels, size, fit)
        return
    pool: ProcessPoolExecutor | None = None
    pending: deque[tuple[list[Sample], Future]] = deque()
    try:
        while chunk := list(islice(samples, CHUNK)):
            if all(isinstance(s.raw, np.ndarray) for s in chunk):
                future = _done(_decode_chunk([s.raw for s in chunk], channels, size, fit))
            else:
                pool = pool or _pool(workers)
                future = pool.submit(_decode_chunk, [s.raw for s in chunk], channels, size, fit)
            pending.append((chunk, future))
            while len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield from _emit(*pending.popleft())
        while pending:
            yield from _emit(*pending.popleft())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _emit(chunk: list[Sample], future: Future) -> Iterator[tuple[Sample, np.ndarray | None, str | None]]:
    for sample, (image, reason) in zip(chunk, future.result(), strict=True):
        yield sample, image, reason
