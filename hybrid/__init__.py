"""hybrid: a CPU/GPU hybrid runtime for DeepseekV3-architecture MoE models."""

import os

# torch's OpenMP threads spin after each parallel region (libgomp's default: 300,000 spins), on the
# cores where kt-kernel runs the routed experts next; put to sleep at once, every small op pays a
# wake-up instead (~140 us, measured). A short spin keeps them hot between the ops of one layer and
# gives the cores up soon after. Read once, when torch loads: set here, before we import torch.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "5000")
