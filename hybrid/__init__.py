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
