"""Public routing traces by name: `moeplace datasets list|fetch NAME` (docs/datasets.md)."""

from vllm_moeplace.datasets.fetch import DatasetError, fetch
from vllm_moeplace.datasets.registry import DATASETS, Dataset, cache_root, cached_trace, fetch_command, locate, shared_data_root

__all__ = ["DATASETS", "Dataset", "DatasetError", "cache_root", "cached_trace", "fetch", "fetch_command", "locate", "shared_data_root"]
