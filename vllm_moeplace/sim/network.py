"""Parameters of the cluster-scale simulator, read from a JSON file (`benchmarks/sim_params.json`).

Three kinds of record, each with a free-text `source` that says where its numbers come from:

- `Hardware`: per-GPU link bandwidths and latencies (NVLink-class inside a node, RDMA/InfiniBand
  between nodes), achievable GPU FLOP/s and HBM bandwidth, and how the all-to-all is organised.
- `ModelShape`: the MoE layer's sizes (hidden, expert intermediate, bytes per element on the wire).
- `BatchSpec`: how many tokens each EP rank holds in one step, and which tokens of the trace to draw.

The file is a `SimParams`: named records of each kind, so one file can hold e.g. an H800 profile
with DeepEP's measured bandwidths next to an H100 profile with nominal ones.

Units are the ones datasheets use (GB/s = 1e9 bytes/s, microseconds, TFLOP/s, TB/s); the time
model converts them to seconds once (`Hardware.seconds_*`). Pure pydantic + stdlib.
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.jsonio import read_json


class SimParamsError(MoeplaceError):
    """A simulator parameter file or value is invalid. The message names file, field and value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hardware(_Frozen):
    """One GPU cluster kind. Bandwidths are per GPU and per direction (links are full duplex)."""

    nvlink_bandwidth_gbs: float = Field(gt=0)
    """Achievable intra-node bandwidth per GPU per direction, GB/s."""
    nvlink_latency_us: float = Field(ge=0)
    """Fixed cost of an intra-node transfer phase on a rank (launch, signalling), microseconds."""
    rdma_bandwidth_gbs: float = Field(gt=0)
    """Achievable inter-node bandwidth per GPU (its own NIC) per direction, GB/s."""
    rdma_latency_us: float = Field(ge=0)
    """Fixed cost of an inter-node transfer phase on a rank, microseconds."""
    gpu_tflops: float = Field(gt=0)
    """Achievable dense FLOP/s of the expert GEMMs on one GPU, TFLOP/s."""
    hbm_bandwidth_tbs: float = Field(ge=0)
    """Achievable HBM bandwidth for reading expert weights, TB/s; 0 disables the weight-read
    (memory-bound) term of the compute time."""
    node_aggregation: bool = True
    """DeepEP-style dispatch: a token crosses the network once per remote node (to the rank with
    the same local index there), which forwards it over NVLink. False: one RDMA message per
    remote rank."""
    overlap_rdma_nvlink: bool = True
    """A rank's RDMA and NVLink phases run concurrently (DeepEP pipelines them in chunks), so its
    transfer time is the larger of the two; False adds them."""
    source: str = ""
    """Where the numbers come from."""


class ModelShape(_Frozen):
    """Sizes of one MoE layer of a model (routed experts only; shared experts are placement-free)."""

    hidden_size: int = Field(gt=0)
    moe_intermediate_size: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    ffn_matrices: int = Field(default=3, gt=0)
    """Weight matrices per expert of size hidden x intermediate (gated SwiGLU: gate, up, down = 3)."""
    dispatch_bytes_per_element: float = Field(gt=0)
    """Bytes per hidden element sent in dispatch (FP8 with a 4-byte scale per 128 values: 1.03125)."""
    combine_bytes_per_element: float = Field(gt=0)
    """Bytes per hidden element sent back in combine (BF16: 2)."""
    weight_bytes_per_element: float = Field(gt=0)
    """Bytes per expert weight element read from HBM (BF16: 2, FP8: 1)."""
    source: str = ""

    @property
    def flops_per_pair(self) -> float:
        """FLOPs of one (token, expert) pair: a multiply-add (2 FLOPs) per weight element."""
        return 2.0 * self.ffn_matrices * self.hidden_size * self.moe_intermediate_size

    @property
    def expert_weight_bytes(self) -> float:
        return float(self.ffn_matrices * self.hidden_size * self.moe_intermediate_size) * self.weight_bytes_per_element


class BatchSpec(_Frozen):
    """One forward step: `tokens_per_rank` tokens on every EP rank, drawn from the trace."""

    tokens_per_rank: int = Field(gt=0)
    phase: Literal["any", "prefill", "decode"] = "any"
    """Which trace tokens to draw from (a trace without tokens of the phase is an error)."""
    steps: int = Field(default=2, gt=0)
    """Independent batches drawn; reported times are their mean."""
    seed: int = 0


class SimParams(_Frozen):
    hardware: dict[str, Hardware]
    models: dict[str, ModelShape]
    batches: dict[str, BatchSpec]
    default_hardware: str

    @model_validator(mode="after")
    def _default_known(self) -> "SimParams":
        if self.default_hardware not in self.hardware:
            raise ValueError(f"default_hardware {self.default_hardware!r} is not one of the hardware profiles {sorted(self.hardware)}")
        return self


def _pydantic_message(src: str, e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    shown = "{...}" if isinstance(value, dict) else json.dumps(value, default=str)[:120]
    where = f"field '{loc}': " if loc else ""
    return f"{src}: {where}{err['msg']} (value {shown})"


def parse_params(data: object, source: str = "<sim params>") -> SimParams:
    try:
        return SimParams.model_validate(data)
    except ValidationError as e:
        raise SimParamsError(_pydantic_message(source, e)) from None


def load_params(path: str | os.PathLike) -> SimParams:
    """Read and validate a parameter file; every failure is a SimParamsError naming the file."""
    return parse_params(read_json(path, "simulator parameter file", SimParamsError), str(path))
