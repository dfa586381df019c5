"""`moeplace route --plan plan.json --backend URL [--backend URL ...]`: the request router of a
request-aware plan (docs/router.md), an OpenAI-compatible HTTP front for the DP ranks.

Everything is checked before it listens: the plan has a `request_routing` section, the backends
match its DP ranks and answer, the signature server captures the plan's signature layers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket

from vllm_moeplace.plan import load_plan
from vllm_moeplace.router.signature import RouterSetupError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help="plan with a request_routing section (solve --request-groups)")
    parser.add_argument("--backend", action="append", required=True, metavar="URL",
                        help="vLLM API server of DP rank 0, 1, ... in order: one per DP rank (vLLM's external "
                             "load balancing), a URL repeated once per DP rank its server fronts (hybrid: one per "
                             "node), or one URL for all; shared servers are pinned by vLLM's X-data-parallel-rank "
                             "header")
    parser.add_argument("--signature-server", metavar="URL",
                        help="vLLM server that computes signatures (default: the first backend)")
    parser.add_argument("--signature-source", choices=("capture", "routed-experts"), default="capture",
                        help="capture: moeplace's routing capture on the signature server (runs on CPU); "
                             "routed-experts: vLLM's --enable-return-routed-experts reply field (GPU builds)")
    parser.add_argument("--signature-prefix-tokens", type=int, default=0, metavar="N",
                        help="signature from the prompt's first N tokens only (colocated DP: a short prefill at "
                             "arrival); 0 = the whole prompt (disaggregated: the prefill's own routing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per backend request")


def run(args: argparse.Namespace) -> int:
    import httpx
    import uvicorn

    from vllm_moeplace.router.app import RouterState, backends_for, build_app
    from vllm_moeplace.router.signature import SignatureClient

    plan = load_plan(args.plan)
    routing = plan.request_routing
    if routing is None:
        raise RouterSetupError(f"{args.plan}: no request_routing section; a request router needs a plan solved with "
                               "--request-groups")
    if not 0 <= args.port <= 65535:
        raise RouterSetupError(f"--port {args.port}: must be in 0..65535 (0: any free port)")
    if not args.timeout > 0:
        raise RouterSetupError(f"--timeout {args.timeout}: must be positive (seconds)")
    if args.signature_prefix_tokens < 0:
        raise RouterSetupError(f"--signature-prefix-tokens {args.signature_prefix_tokens}: must be >= 0")
    dp = sum(len(r) for r in routing.group_ranks)
    backends = backends_for(args.backend, dp)
    sig = SignatureClient(None, args.signature_server or backends[0].url, layers=list(routing.layers),
                          num_experts=plan.num_experts, source=args.signature_source,
                          prefix_tokens=args.signature_prefix_tokens, timeout=args.timeout)

    async def check() -> None:
        async with httpx.AsyncClient(timeout=30.0) as c:
            for url in sorted({b.url for b in backends}):
                try:
                    (await c.get(url + "/health")).raise_for_status()
                except Exception as e:  # noqa: BLE001 - one line naming the backend
                    raise RouterSetupError(f"--backend {url}: not healthy ({type(e).__name__}: {e})") from None
            sig.bind(c)
            await sig.check()

    asyncio.run(check())
    state = RouterState(routing, backends, sig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied call otherwise
    servers = len({b.url for b in backends})
    shape = ("one API server per DP rank" if servers == dp else
             f"{servers} API server(s), pinned by the X-data-parallel-rank header")
    # Bind first (port 0: the system chooses) so the line below names the port really listened on.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:  # the port's range was checked above
        raise RouterSetupError(f"--host {args.host} --port {args.port}: cannot listen ({e.strerror or e})") from None
    port = sock.getsockname()[1]
    # Listening before the line below: a client that reads it may connect at once; the backlog
    # holds its connection until uvicorn accepts (bound-but-not-listening would refuse it).
    sock.listen(2048)
    print(f"moeplace router: {routing.num_groups} group(s) over {dp} DP rank(s) ({shape}); signature = "
          f"{routing.kind} at layers {list(routing.layers)} via {args.signature_source} on {sig.url}"
          + (f", first {args.signature_prefix_tokens} prompt tokens" if args.signature_prefix_tokens else "")
          + f"; listening on http://{args.host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(state, args.timeout), log_level="warning"))
    server.run(sockets=[sock])
    return 0
