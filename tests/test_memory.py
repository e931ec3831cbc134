"""course.memory.peak_memory counts what is live at the peak, not what was ever allocated.

Tolerance: the resident set moves in pages and the interpreter allocates a little on the side;
2 MiB of slack on peaks of 8 to 40 MiB tells a right answer (one block) from a wrong one (the
sum of all blocks, 80 MiB) with room to spare.
"""

from __future__ import annotations

import pytest
import torch

from course.memory import cpu_peak_supported, peak_memory

MiB = 2**20
pytestmark = pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux with glibc")


def test_freed_blocks_do_not_count():
    def one_at_a_time():
        for _ in range(10):
            block = torch.ones(2 * MiB)  # 8 MiB, freed at the next iteration
            del block

    one_at_a_time()  # warm-up
    _, peak = peak_memory(one_at_a_time)
    assert 7 * MiB < peak < 10 * MiB, peak / MiB


def test_the_peak_of_overlapping_blocks():
    def overlapping():
        a = torch.ones(10 * MiB // 4 * 4)  # 40 MiB
        b = torch.ones(5 * MiB)  # 20 MiB, while a is alive
        del a
        c = torch.ones(2 * MiB)  # 8 MiB, after a is gone
        return float(b[0] + c[0])

    overlapping()
    result, peak = peak_memory(overlapping)
    assert result == 2.0
    assert 58 * MiB < peak < 62 * MiB, peak / MiB


def test_other_devices_give_none_or_a_number():
    result, peak = peak_memory(lambda: 3, "meta")
    assert result == 3 and peak is None
