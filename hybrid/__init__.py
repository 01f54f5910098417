"""hybrid: a CPU/GPU hybrid runtime for DeepseekV3-architecture MoE models."""

import os
import sys

# torch's OpenMP threads spin after each parallel region (libgomp's default: 300,000 spins), on the
# cores where kt-kernel runs the routed experts next; put to sleep at once, every small op pays a
# wake-up instead (~140 us, measured). A short spin keeps them hot between the ops of one layer and
# gives the cores up soon after. libgomp reads this once, as torch loads: it takes effect only when
# hybrid is imported first (the `hybrid` command is; import hybrid before torch in your own code).
if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "5000")

# Whether torch's OpenMP threads give their cores up soon after each op, so that kt-kernel's
# spinning threads may run below them (hybrid/experts/kt/pool.py): known only if set before torch.
OPENMP_YIELDS = "torch" not in sys.modules and (
    os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    or (os.environ.get("OMP_WAIT_POLICY") is None and int(os.environ.get("GOMP_SPINCOUNT", "300000")) <= 20000))


def _keep_freed_memory() -> None:
    """glibc's malloc hands each freed block over its mmap threshold back to the OS, and a prefill's
    activations are such blocks: every op then page-faults fresh memory in, which made softmax and
    copies 2-4x slower and a 2,048-token prefill of `mini` 15% slower (Zen 4). Blocks up to 32 MB (the
    most glibc allows) come from the heap instead, and the heap's top goes back to the OS only past 2
    GB free: the process keeps what its largest pass used, as a serving process does anyway."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 2**31 - 1)  # an int: the most it takes


_keep_freed_memory()
