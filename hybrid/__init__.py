"""hybrid: a CPU/GPU hybrid runtime for DeepseekV3-architecture MoE models."""

import os

# torch's OpenMP threads spin after each parallel region by default, on the cores where kt-kernel
# runs the routed experts next; asleep when idle, they leave those cores to it. Read once, when
# torch loads: set here, before anything of ours imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
