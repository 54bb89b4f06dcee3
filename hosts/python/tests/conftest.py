"""What the tests share: the Rust `aemp` binary and the engine component, found through
AEMP_BIN and AEMP_WASM_DIR (default: the repository's target/). Missing ones fail."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
AEMP_BIN = Path(os.environ.get("AEMP_BIN", ROOT / "target" / "debug" / "aemp"))
os.environ.setdefault("AEMP_WASM_DIR", str(ROOT / "target" / "wasm"))


def pytest_configure(config: pytest.Config) -> None:
    # Loud, not a skip: these tests are the host's interop proof.
    assert AEMP_BIN.is_file(), f"{AEMP_BIN} missing: cargo build -p aemp-host (or set AEMP_BIN)"
    wasm = Path(os.environ["AEMP_WASM_DIR"]) / "aemp_engine.component.wasm"
    assert wasm.is_file(), f"{wasm} missing: build the component (or set AEMP_WASM_DIR)"


@dataclass
class RustNode:
    addr: str
    proc: asyncio.subprocess.Process
    rc: dict[str, object]
    dir: Path


async def rust_node(node_id: str, secret: str, framing: str = "cbor", cert: bool = False,
                    extra: tuple[str, ...] = ()) -> RustNode:
    """Starts `aemp run --echo` on loopback; returns once it prints its address."""
    d = Path(tempfile.mkdtemp(prefix="aemp-py-"))
    rc = d / "rc"
    rc.write_text(json.dumps({"secret": secret}))
    env = {**os.environ, "PERL_ANYEVENT_MP_RC": str(rc)}
    if cert:
        subprocess.run([str(AEMP_BIN), "gencert"], env=env, check=True, capture_output=True)
    proc = await asyncio.create_subprocess_exec(
        str(AEMP_BIN), "run", "--echo", "--nodeid", node_id, "--listen", "127.0.0.1:0",
        "--framing", framing, *extra, env=env, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    addr = None
    # `--connect` dials before the echo port exists: a test may use the node once both
    # lines are out.
    while line := (await asyncio.wait_for(proc.stdout.readline(), 20)).decode():
        m = re.match(r"^node \S+ listening on (\S+)$", line.strip())
        if m:
            addr = m.group(1)
        elif line.startswith("echo port ") and addr is not None:
            return RustNode(addr, proc, json.loads(rc.read_text()), d)
    raise AssertionError("aemp run printed no address and echo port")


@pytest.fixture
async def rust() -> AsyncIterator[list[RustNode]]:
    """Rust nodes a test starts; killed at its end."""
    nodes: list[RustNode] = []
    yield nodes
    for n in nodes:
        if n.proc.returncode is None:
            n.proc.kill()
        await n.proc.wait()
