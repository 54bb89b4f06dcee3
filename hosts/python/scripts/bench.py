"""Python host figures, loopback: messages/s one way between two Python nodes, messages/s
and round-trip p50 through a Rust `aemp run --echo` node ($AEMP_BIN).
Usage: AEMP_BIN=... AEMP_WASM_DIR=... python scripts/bench.py [COUNT]

The Rust node's build counts (a debug binary is far slower): set AEMP_BIN to the release
binary the Rust and JS figures of the same run use, and compare only those."""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aemp

ROOT = Path(__file__).resolve().parents[3]
AEMP_BIN = os.environ.get("AEMP_BIN", str(ROOT / "target" / "debug" / "aemp"))
BATCH = 1000


async def one_way(count: int) -> float:
    async with await aemp.Node.start("bench-rx", secret="s", binds=["127.0.0.1:0"]) as rx, \
            await aemp.Node.start("bench-tx", secret="s") as tx:
        port = rx.port("in")
        tx.connect(rx.listen_addrs[0])
        await tx.wait_up("bench-rx")
        start = time.perf_counter()

        async def produce() -> None:
            for _ in range(count // BATCH):
                await tx.send_batch([("bench-rx#in", ("ping", 123))] * BATCH)

        producer = asyncio.create_task(produce())
        for _ in range(count // BATCH * BATCH):
            await port.recv()
        await producer
        return count // BATCH * BATCH / (time.perf_counter() - start)


async def via_rust(count: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        rc = Path(tmp) / "rc"
        rc.write_text('{"secret": "s"}')
        proc = await asyncio.create_subprocess_exec(
            AEMP_BIN, "run", "--echo", "--nodeid", "bench-rust", "--listen", "127.0.0.1:0",
            env={**os.environ, "PERL_ANYEVENT_MP_RC": str(rc)}, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            m = None
            while m is None and (line := await proc.stdout.readline()):
                m = re.match(r"node \S+ listening on (\S+)", line.decode())
            assert m, "aemp run printed no address"
            async with await aemp.Node.start("bench-py", secret="s") as py:
                port = py.port()
                py.connect(m.group(1))
                await py.wait_up("bench-rust")
                rtts = []
                for _ in range(2000):
                    t = time.perf_counter()
                    await py.send("bench-rust#echo", port.id, 1)
                    await port.recv()
                    rtts.append(time.perf_counter() - t)
                n = count // BATCH * BATCH
                start = time.perf_counter()

                async def produce() -> None:
                    for _ in range(n // BATCH):
                        await py.send_batch([("bench-rust#echo", (port.id, "ping", 123))] * BATCH)

                producer = asyncio.create_task(produce())
                for _ in range(n):
                    await port.recv()
                await producer
                return n / (time.perf_counter() - start), statistics.median(rtts) * 1e6
        finally:
            proc.kill()
            await proc.wait()


async def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"# AEMP_BIN={AEMP_BIN}, {count} messages a run")
    print(f"py_msgs_per_s_one_way_py_to_py   {await one_way(count):12.0f}")
    rate, p50 = await via_rust(count)
    print(f"py_msgs_per_s_echo_via_rust      {rate:12.0f}  (out and back: each counted once)")
    print(f"py_rtt_p50_us_via_rust           {p50:12.1f}")


asyncio.run(main())
