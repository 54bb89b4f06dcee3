"""What the tests share: the Rust `aemp` binary and the engine component, found through
AEMP_BIN and AEMP_WASM_DIR (default: the repository's target/). Missing ones fail."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import aemp

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


class RustNodes(list[RustNode]):
    """The Rust nodes of one test (the ``rust`` fixture), killed at its end."""

    async def start(self, node_id: str, secret: str, framing: str = "cbor",
                    cert: bool = False, extra: tuple[str, ...] = ()) -> RustNode:
        """:func:`rust_node`, kept for the end of the test."""
        node = await rust_node(node_id, secret, framing, cert, extra)
        self.append(node)
        return node

    async def dialed_by(self, py: aemp.Node, node_id: str, secret: str,
                        framing: str = "cbor") -> RustNode:
        """A Rust node that ``py`` connects to, once it is up for ``py``."""
        node = await self.start(node_id, secret, framing)
        py.connect(node.addr)
        await py.wait_up(node_id)
        return node

    async def dialing(self, py: aemp.Node, node_id: str, secret: str) -> RustNode:
        """A Rust node that connects to ``py``'s first listener, once it is up for ``py``."""
        node = await self.start(node_id, secret, extra=("--connect", py.listen_addrs[0]))
        await py.wait_up(node_id)
        return node


@pytest.fixture
async def rust() -> AsyncIterator[RustNodes]:
    """Rust nodes a test starts; killed at its end."""
    nodes = RustNodes()
    yield nodes
    for n in nodes:
        if n.proc.returncode is None:
            n.proc.kill()
        await n.proc.wait()


def logs_of(node: aemp.Node) -> list[str]:
    """The node's log messages from now on."""
    logs: list[str] = []
    node.on("log", lambda level, message: logs.append(message))
    return logs


def downs_of(node: aemp.Node) -> dict[str, str]:
    """The first node-down reason of each node from now on."""
    downs: dict[str, str] = {}

    def on_down(peer: str, reason: str) -> None:
        downs.setdefault(peer, reason)

    node.on("node-down", on_down)
    return downs


async def echo(py: aemp.Node, peer: str, *args: object) -> list[object]:
    """What ``peer``'s echo port (``aemp run --echo``: it sends the rest of a message to
    the port in its first argument) sends back for ``args``."""
    async with py.port() as back:
        await py.send(f"{peer}#echo", back.id, *args)
        return await asyncio.wait_for(back.recv(), 10)


async def assert_sender_held_back(rx: aemp.Node, tx: aemp.Node,
                                  stopped: Callable[[aemp.Port], bool]) -> None:
    """``tx`` sends 1000 messages of 16 KiB (16 MiB, far more than the socket buffers
    hold) to a port of ``rx`` that nobody reads: a second later ``stopped(port)`` must
    hold (the port stopped at its bound) and the sender must still wait on TCP instead
    of queueing everything; then every message arrives, in order."""
    inbox = rx.port("inbox")
    tx.connect(rx.listen_addrs[0])
    await tx.wait_up(rx.id)
    blob = b"x" * 16384
    count = 1000

    async def produce() -> None:
        for i in range(count):
            await tx.send(inbox.id, i, blob)

    producer = asyncio.create_task(produce())
    await asyncio.sleep(1.0)
    assert stopped(inbox), (inbox.pending, inbox.pending_bytes)
    assert not producer.done()
    got = [(await asyncio.wait_for(inbox.recv(), 10))[0] for _ in range(count)]
    await producer
    assert got == list(range(count))
