"""vllm-moeplace: topology-aware expert placement for MoE serving in vLLM.

Nothing heavy happens at import: vLLM and torch are imported only inside `serving/` and
`profiling/` functions that need them.
"""

__version__ = "0.1.0"
