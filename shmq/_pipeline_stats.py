"""The statistics of :class:`shmq.pipeline.Pipeline`: frozen snapshots."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ("StageStatistics", "PipelineStatistics")


@dataclass(frozen=True)
class StageStatistics:
    """A snapshot of one stage's counters (summed over its workers, the
    killed ones included)."""

    #: The stage's name (``"1:resize"``: position and function name).
    name: str
    #: ``"map"``, ``"filter"``, ``"flat_map"``, ``"batch"`` or ``"unbatch"``.
    kind: str
    #: Worker processes of the stage.
    workers: int
    #: Items the workers took from the stage's queue (a run of cheap items
    #: counts its items; a list made by a batch stage counts 1).
    items_in: int
    #: Values the workers passed on (a flat_map counts each child).
    items_out: int
    #: Items queued for the stage (put by the stage before, or by the
    #: feeder, and not yet taken) plus those its workers hold now (results
    #: waiting for room in the next stage included): at most the stage's
    #: ``max_in_flight``.
    in_flight: int
    #: Items the stage's filter dropped.
    filtered: int
    #: Items dropped after an exception under ``on_error="skip"``.
    skipped: int
    #: Items sent to the dead letters by this stage (crashes included).
    dead_letters: int
    #: Calls repeated after an exception, plus items fed again after a crash.
    retries: int
    #: Workers of this stage that died and were replaced.
    crashes: int
    #: Fraction of the workers' wall time spent in the stage's function.
    busy_fraction: float
    #: Mean seconds of the function per item taken (0.0 before the first).
    seconds_per_item: float


@dataclass(frozen=True)
class PipelineStatistics:
    """A snapshot of a pipeline.  Every source item taken is in exactly one of
    ``with_output``, ``filtered``, ``skipped``, ``dead_letters``, ``empty``,
    ``merged`` and ``in_flight``."""

    #: One entry per stage, in order.
    stages: Tuple[StageStatistics, ...]
    #: Items taken from the source.
    source_items: int
    #: Values delivered to the caller.
    outputs: int
    #: Source items that produced at least one output.
    with_output: int
    #: Source items a filter dropped.
    filtered: int
    #: Source items dropped after an error under ``on_error="skip"``.
    skipped: int
    #: Source items that ended in the dead letters.
    dead_letters: int
    #: Source items a flat_map turned into nothing.
    empty: int
    #: Source items merged into another item's output (a batch not unbatched).
    merged: int
    #: Source items taken and not yet accounted for.
    in_flight: int
    #: Items fed again because the worker holding them died.
    crash_retries: int
    #: Results of an earlier attempt that arrived again and were dropped.
    duplicates_dropped: int
    #: Seconds since the pipeline started.
    elapsed_seconds: float
    #: Name of the stage with the highest busy fraction (None before start).
    bottleneck: Optional[str]
