"""Timers for latency: warm-up, then many timed runs, and the percentiles of the series (edge.md §7).

Host runs are timed with perf_counter; CUDA runs with CUDA events on the stream and, where capture works, a
replayed CUDA graph (launch overhead removed). Inputs are real images from a pool when one is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rkdtool.errors import UsageError


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles of one timed series, in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    """Gives back p50/p90/p99/mean/min/max of a series of latencies in ms."""
    if len(samples_ms) == 0:
        raise ValueError("no latency samples")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LatencyStats(float(p50), float(p90), float(p99), float(a.mean()), float(a.min()), float(a.max()))


def sample_inputs(
    shape: Sequence[int], batch: int, pool: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Gives back `batch` float32 images: from `pool` (repeated if short) or seeded uniform [0, 1] noise."""
    if pool is not None and len(pool):
        reps = -(-batch // len(pool))
        return np.ascontiguousarray(np.concatenate([pool] * reps)[:batch], dtype=np.float32)
    rng = np.random.default_rng(seed)
    return rng.random((batch, *shape), dtype=np.float32)


def time_host(fn: Callable[[], object], *, warmup: int, runs: int) -> list[float]:
    """Gives back `runs` wall-clock latencies (ms, perf_counter) of fn() after `warmup` untimed calls."""
    if runs < 1 or warmup < 0:
        raise UsageError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_cuda(model: nn.Module, x: torch.Tensor, *, warmup: int, runs: int, use_graph: bool):
    """Gives back (latencies in ms from CUDA events, whether a CUDA graph was replayed, a note)."""
    note = ""
    step: Callable[[], object] = lambda: model(x)  # noqa: E731
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            for _ in range(max(warmup, 3)):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graphed = False
        if use_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    model(x)
                step, graphed = graph.replay, True
            except RuntimeError as exc:  # capture fails for some ops: time eagerly and say why
                note = f"CUDA graph capture failed, timed eagerly: {exc}"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(runs):
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    return samples, graphed, note
