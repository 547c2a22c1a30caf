"""Every schedule runs without deadlock when a send completes only once its receive is posted (NCCL).

gloo buffers sends, so the equivalence tests cannot see a schedule of transfers that deadlocks under
NCCL. Here every rank routes its batch_isend_irecv through rendezvous_p2p.RendezvousP2P (a batch runs
to completion before the next, a send waits for the matching receive, messages match by order) and
runs test_pipeline_executor's bitwise comparison with a single process for 1F1B, ZB1P, DualPipe and
DualPipeV at PP 2, 4 and 8. A send that waits DEADLINE_S seconds for its receive raises (a deadlock);
the test's own spawn timeout catches anything else that hangs.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from moetron.parallel.local import run_local
from rendezvous_p2p import install_rendezvous
from test_pipeline_executor import run_case

DEADLINE_S = 20.0


def run_cases(rank: int, world: int, cases: list[tuple]) -> None:
    install_rendezvous(DEADLINE_S)
    for case in cases:
        run_case(*case)
        dist.barrier()


@pytest.mark.parametrize("world", [2, 4, 8])
def test_every_schedule_under_rendezvous_sends(world: int):
    cases = [("1f1b", 2 * world, 2), ("zb1p", 2 * world), ("dualpipe", 2 * world, 2), ("dualpipev", 2 * world)]
    run_local(run_cases, world, args=(cases,), timeout=DEADLINE_S * len(cases) + 60)
