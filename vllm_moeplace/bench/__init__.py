"""Serving benchmark: real `vllm serve` processes driven over HTTP on loopback."""
