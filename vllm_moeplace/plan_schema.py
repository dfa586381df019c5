"""The plan file's JSON Schema, generated from the pydantic models that parse it (`plan.PlanModel`).

Published so tools in other languages can check a plan's structure without this package
(`moeplace validate --schema`). The schema is the structural half of the contract; the cross-field
rules (ep_size rank lists per layer, ids in 0..num_experts-1, no expert twice on a rank, every
expert placed, equal slot counts) need values from several fields and stay in
`plan.validate_plan`, which `moeplace validate` runs. The schema says so in its description.

Generated, not hand-written, so it cannot drift from the parser: the few facts pydantic cannot see
(the format string and the readable versions are checked by validators, the layer keys are
canonical integers) are added here from the same constants the parser uses.
"""

from __future__ import annotations

import copy
from typing import Any

from vllm_moeplace.plan import PLAN_FORMAT, PLAN_VERSION, PLAN_VERSION_COPIES, READ_VERSIONS, PlanModel
from vllm_moeplace.replica import REPLICA_RULE

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://github.com/vllm-moeplace/vllm-moeplace/schemas/plan.schema.json"
# A canonical non-negative integer, as `parse_plan` demands of layer keys ("01" and "+1" are refused).
LAYER_KEY_PATTERN = "^(0|[1-9][0-9]*)$"


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a plan file, versions 1 and 2."""
    schema = copy.deepcopy(PlanModel.model_json_schema())
    props = schema["properties"]
    props["format"].update(const=PLAN_FORMAT, description="File kind; exactly this string.")
    props["version"].update(
        enum=list(READ_VERSIONS),
        description=f"{PLAN_VERSION}: every expert once per layer; {PLAN_VERSION_COPIES}: redundant copies, "
        "served by the replica rule named in replica_rule.",
    )
    props["layers"].update(
        propertyNames={"pattern": LAYER_KEY_PATTERN},
        description="Decoder-layer index -> one list per EP rank (ep_size lists) of the logical experts in "
        "that rank's slots; every list of every layer has the same length.",
    )
    # Version 2's only rule; a null or absent value means the same rule (the reader's default).
    props["replica_rule"]["anyOf"] = [{"const": REPLICA_RULE}, {"type": "null"}]
    props["replica_rule"]["description"] = "Version 2 only: how a token picks among an expert's copies."
    # The optional request-routing section: its own versioned model (`request_routing`).
    from vllm_moeplace.request_routing import RequestRoutingModel

    routing = RequestRoutingModel.model_json_schema()
    schema.setdefault("$defs", {}).update(routing.pop("$defs", {}))
    schema["$defs"]["RequestRoutingModel"] = routing
    props["request_routing"] = {
        "anyOf": [{"$ref": "#/$defs/RequestRoutingModel"}, {"type": "null"}],
        "default": None,
        "description": "Optional: the request router (signature, group centroids, group -> DP ranks); "
        "plans without it route requests evenly.",
    }
    props["solver"]["description"] = "Free-form provenance (method, options, objective); not interpreted by readers."
    schema.update(
        {
            "$schema": SCHEMA_DIALECT,
            "$id": SCHEMA_ID,
            "title": "vllm-moeplace placement plan",
            "description": (
                "Structural schema of a vllm-moeplace plan file (versions "
                f"{', '.join(map(str, READ_VERSIONS))}). A file that passes it may still break the cross-field "
                "rules checked by `moeplace validate` (vllm_moeplace.plan.validate_plan): ep_size rank lists per "
                "layer, expert ids in 0..num_experts-1, no expert twice on one rank, every expert on some rank, "
                "equal slot counts, layer keys among model.moe_layers, replica_rule only in version 2."
            ),
        }
    )
    # Keep "$schema" and "$id" first so a reader of the printed file sees what it is at once.
    head = {k: schema.pop(k) for k in ("$schema", "$id", "title", "description")}
    return {**head, **schema}
