"""The baton of an overlapped pair: exactly one side runs; a side that reaches a transfer's consumer hands
over, and resumes when the other side hands back or finishes (the order of comm/overlap.py's diagram)."""

import threading

from moetron.comm import Transport
from moetron.comm.overlap import Baton


def run_pair(forward_steps: int, backward_steps: int) -> list[str]:
    """Each side does `steps` sub-steps, handing over between them (a wait for its transfer); returns the order."""
    transport = Transport()
    baton = Baton(transport, first="B")
    order, running = [], []

    def side(name: str, steps: int) -> None:
        for i in range(steps):
            running.append(name)
            assert running == [name], running  # nobody else runs meanwhile
            order.append(f"{name}{i}")
            running.pop()
            if i + 1 < steps:
                baton.hand_over()
        baton.finish()

    helper = threading.Thread(target=side, args=("B", backward_steps))
    helper.start()
    baton.wait_for_turn("F")
    side("F", forward_steps)
    helper.join()
    return order


def test_sides_alternate_at_each_wait_backward_first():
    assert run_pair(3, 3) == ["B0", "F0", "B1", "F1", "B2", "F2"]


def test_a_finished_side_lets_the_other_run_to_its_end():
    assert run_pair(4, 2) == ["B0", "F0", "B1", "F1", "F2", "F3"]
    assert run_pair(1, 3) == ["B0", "F0", "B1", "B2"]
