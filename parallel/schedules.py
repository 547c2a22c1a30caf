"""Every schedule by name: `build_schedule("dualpipe", num_ranks=4, num_microbatches=8)`."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from .actions import Schedule, ScheduleError
from .schedule_1f1b import one_f_one_b
from .schedule_dualpipe import dualpipe, dualpipev
from .schedule_zb1p import zb1p

SCHEDULES: MappingProxyType[str, Callable[[int, int], Schedule]] = MappingProxyType(
    {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}
)


def build_schedule(name: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """The named schedule for `num_ranks` pipeline ranks and `num_microbatches` micro-batches.

    1F1B and ZB1P run one stage per rank, DualPipe holds two copies of PP stages on PP ranks,
    DualPipeV holds 2N stages on N ranks (`schedule.num_stages` says how many to build).
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SCHEDULES:
        raise ScheduleError(
            f"schedule {name!r} is not known; valid names are {', '.join(sorted(SCHEDULES))}."
        )
    return SCHEDULES[key](num_ranks, num_microbatches)
