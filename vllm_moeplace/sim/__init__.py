"""Cluster-scale simulator: per-step MoE dispatch + compute + combine time of a placement on a
GPU cluster, from a routing trace (docs/simulator.md). Pure numpy + pydantic; no vLLM or torch."""
