"""Readers of routing traces published by others, one module per format.

Each module defines `read(src, opts) -> Trace`; `vllm_moeplace.profiling.importers` is the
registry and the only entry point the CLI uses. Pure numpy + stdlib: no vLLM or torch here.
"""
