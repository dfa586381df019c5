"""The request router of request-aware plans (issue 12, docs/router.md).

`moeplace route` is an HTTP front for a vLLM deployment with several data-parallel ranks: it
computes each request's signature, lets the plan's `request_routing` choose the request's group of
DP ranks (`request_routing.Router`, the same function `evaluate` scores), and pins the request to a
rank of that group with vLLM's own means (one API server per DP rank, or the
`X-data-parallel-rank` header of one API server in front of all of them).
"""
