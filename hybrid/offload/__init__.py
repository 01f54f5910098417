"""Expert offload: what runs where in the runtime's terms, and each MoE layer's routed experts split
between the CPU backend and the GPU (hot experts resident, long prompts streamed, deferral)."""
