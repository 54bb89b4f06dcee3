"""The Python host's bounds: write queues, write timeout, port bytes, stalled ports."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from typing import Any

import pytest

import aemp

from conftest import RustNodes, assert_sender_held_back, downs_of, echo, logs_of


async def flood_until_down(py: aemp.Node, peer: str, downs: dict[str, str],
                           batch: int = 1) -> None:
    """Sends 64 KiB messages to a peer's echo port, ``batch`` per ``send_batch``, until
    the node drops it; a send that waits gets 50 ms before the next goes in beside it."""
    message = (f"{peer}#echo", (f"{py.id}#nobody", b"x" * 65536))
    sends: list[asyncio.Future[None]] = []
    async with asyncio.timeout(30):
        while peer not in downs:
            sends.append(asyncio.ensure_future(py.send_batch([message] * batch)))
            await asyncio.wait([sends[-1]], timeout=0.05)
        # The connection is gone: nothing waits for it any more.
        await asyncio.gather(*sends)


async def stopped_and_live(py: aemp.Node, rust: RustNodes, name: str) -> None:
    """Two Rust nodes connected to ``py``; ``{name}-stuck`` is stopped (reads nothing)."""
    for suffix in ("stuck", "live"):
        await rust.dialing(py, f"{name}-{suffix}", "s")
    os.kill(rust[0].proc.pid, signal.SIGSTOP)


async def fill_until_sends_wait(py: aemp.Node, peer: str) -> asyncio.Future[None]:
    """Sends 64 KiB messages to the stopped ``peer`` one by one until one waits (its
    connection holds more than its high water); returns that send."""
    blob = b"x" * 65536
    sent = 0
    async with asyncio.timeout(30):
        while True:
            send = asyncio.ensure_future(py.send(f"{peer}#echo", f"{py.id}#nobody", blob))
            done, _ = await asyncio.wait([send], timeout=0.5)
            if not done:
                assert sent > 0
                return send
            send.result()
            sent += 1


async def test_peer_that_does_not_read_is_cut_off_past_the_write_limit(
        rust: RustNodes) -> None:
    limit = 512 * 1024  # below the level where sends wait, so only the limit stops them
    async with await aemp.Node.start("py-wq", secret="s", binds=["127.0.0.1:0"],
                                     max_write_queue=limit) as py:
        downs = downs_of(py)
        await stopped_and_live(py, rust, "wq")
        await flood_until_down(py, "wq-stuck", downs)
        assert f"peer does not read: more than {limit} bytes waiting" in downs["wq-stuck"]
        assert "wq-live" not in downs
        assert await echo(py, "wq-live", "still served") == ["still served"]


async def test_peer_that_does_not_read_is_cut_off_after_the_write_timeout(
        rust: RustNodes) -> None:
    timeout_ms = 1000
    async with await aemp.Node.start("py-wt", secret="s", binds=["127.0.0.1:0"],
                                     write_timeout_ms=timeout_ms) as py:
        downs = downs_of(py)
        await stopped_and_live(py, rust, "wt")
        await flood_until_down(py, "wt-stuck", downs)
        assert f"peer does not read: nothing written for {timeout_ms} ms" in downs["wt-stuck"]
        assert "wt-live" not in downs
        assert await echo(py, "wt-live", "still served") == ["still served"]


async def test_connection_holding_most_is_cut_off_past_the_write_total(
        rust: RustNodes) -> None:
    total = 512 * 1024
    async with await aemp.Node.start("py-wtot", secret="s", binds=["127.0.0.1:0"],
                                     max_write_total=total) as py:
        downs = downs_of(py)
        await stopped_and_live(py, rust, "wtot")
        # Sends wait past half the total, so only a batch (it goes in whole) takes the
        # connections past it.
        await flood_until_down(py, "wtot-stuck", downs, batch=8)
        assert (f"peer does not read: the node's connections have more than {total} bytes "
                "waiting, this one the most") in downs["wtot-stuck"]
        assert "wtot-live" not in downs
        assert await echo(py, "wtot-live", "still served") == ["still served"]


async def test_invalid_bounds_refused() -> None:
    for bound in ("port_capacity", "port_bytes", "port_stall_ms", "max_write_queue",
                  "max_write_total", "write_timeout_ms"):
        bad: dict[str, Any] = {bound: 0}
        with pytest.raises(aemp.AempError, match=bound):
            await aemp.Node.start("py-bad", **bad)


async def test_stalled_port_drops_and_the_node_serves_another(rust: RustNodes) -> None:
    capacity, stall_ms, count = 8, 500, 100
    async with await aemp.Node.start("py-stall", secret="s", binds=["127.0.0.1:0"],
                                     port_capacity=capacity, port_stall_ms=stall_ms) as py:
        logs = logs_of(py)
        await rust.dialing(py, "stall-echo", "s")
        stuck, live = py.port("stuck"), py.port("live")
        await py.send_batch([("stall-echo#echo", [stuck.id, i]) for i in range(count)])
        # The echoes come back in order over one connection: this one arrives only once
        # the node reads past the stuck port's flood.
        await py.send("stall-echo#echo", live.id, "alive")
        assert await asyncio.wait_for(live.recv(), 10) == ["alive"]
        warnings = [m for m in logs if m.startswith(f"port {stuck.id} took no message")]
        assert len(warnings) == 1, logs
        m = re.fullmatch(rf"port {stuck.id} took no message for {stall_ms} ms: "
                         r"dropped (\d+) messages for it", warnings[0])
        # Those held past the capacity at the stall were dropped with the line, those that
        # found it full later without one.
        assert m is not None and int(m.group(1)) <= count - capacity
        # It kept the oldest it has room for.
        assert stuck.pending == capacity
        assert [await stuck.recv() for _ in range(capacity)] == [[i] for i in range(capacity)]
        # Taking a message ended the stall: the port takes messages again.
        await py.send("stall-echo#echo", stuck.id, "again")
        assert await asyncio.wait_for(stuck.recv(), 10) == ["again"]


async def test_byte_bound_of_a_port_holds_the_sender_back() -> None:
    port_bytes = 64 * 1024
    async with await aemp.Node.start("py-bb-rx", secret="s", binds=["127.0.0.1:0"],
                                     port_bytes=port_bytes) as rx, \
            await aemp.Node.start("py-bb-tx", secret="s") as tx:
        # 1000 messages, far below the default 1024 messages' worth of room: the port
        # stops at its byte bound (plus one read's worth, at most 256 KiB in asyncio,
        # and one message).
        await assert_sender_held_back(
            rx, tx, lambda inbox: inbox.pending_bytes < port_bytes + 256 * 1024 + 16384)


async def test_peer_that_reads_again_is_read_again(rust: RustNodes) -> None:
    # A connection that cannot write reads nothing more; once the peer reads what waits,
    # the node reads its answers again.
    async with await aemp.Node.start("py-rs", secret="s", binds=["127.0.0.1:0"]) as py:
        downs = downs_of(py)
        await stopped_and_live(py, rust, "rs")
        send = await fill_until_sends_wait(py, "rs-stuck")
        os.kill(rust[0].proc.pid, signal.SIGCONT)
        await asyncio.wait_for(send, 10)
        assert await echo(py, "rs-stuck", "read again") == ["read again"]
        assert "rs-stuck" not in downs


async def test_sends_to_every_node_wait_past_half_the_write_total(
        rust: RustNodes) -> None:
    total = 3 * 1024 * 1024  # half of it is more than one connection's 1 MiB high water
    async with await aemp.Node.start("py-half", secret="s", binds=["127.0.0.1:0"],
                                     max_write_total=total) as py:
        downs = downs_of(py)
        await stopped_and_live(py, rust, "half")
        await asyncio.wait_for(py.send("half-live#echo", f"{py.id}#nobody", 0), 1)
        # Fill the stopped peer's connection to its high water (its sends then wait)...
        send = await fill_until_sends_wait(py, "half-stuck")
        blob = b"x" * 65536
        # ... and past half the total, below the total.
        more = asyncio.ensure_future(py.send_batch(
            [("half-stuck#echo", (f"{py.id}#nobody", blob))] * 10))
        await asyncio.sleep(0.2)
        # Now a send to the live peer waits too, though its own connection is empty.
        live = asyncio.ensure_future(py.send("half-live#echo", f"{py.id}#nobody", 1))
        done, _ = await asyncio.wait([live], timeout=1.0)
        assert not done, "a send to the live peer went on past half of max_write_total"
        os.kill(rust[0].proc.pid, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(send, more, live), 20)
        assert await echo(py, "half-live", "served again") == ["served again"]
        assert not downs


async def test_own_sends_to_a_full_local_port_are_refused() -> None:
    async with await aemp.Node.start("py-pf", port_capacity=2) as py:
        port = py.port()
        with pytest.raises(aemp.PortFullError) as e:
            await py.send_batch([(port.id, [1]), (port.id, [2]), (port.id, [3])])
        assert e.value.kind == "port-full"
        assert str(e.value) == f"port {port.id} is full (2 messages or {16 << 20} bytes waiting)"
        assert port.pending == 2
        with pytest.raises(aemp.PortFullError):
            await py.send(port.id, 4)
        assert [await port.recv(), await port.recv()] == [[1], [2]]
        await py.send(port.id, 3)
        assert await port.recv() == [3]
        # Other ports are not affected.
        other = py.port()
        await py.send(other.id, "fine")
        assert await other.recv() == ["fine"]
    async with await aemp.Node.start("py-pf-bytes", port_bytes=1024) as py:
        one = py.port()
        blob = b"x" * 4096
        # Two sends of one round: the first (an empty port takes one message of any
        # size) goes in, the second finds no room.
        results = await asyncio.gather(py.send(one.id, blob), py.send(one.id, "x"),
                                       return_exceptions=True)
        assert results[0] is None and isinstance(results[1], aemp.PortFullError)
        assert one.pending == 1
        # Its cost: the array head, a 3-byte byte-string head, the bytes, and 32.
        assert one.pending_bytes == 1 + 3 + len(blob) + 32


async def test_engine_settings_reach_the_engine() -> None:
    async with await aemp.Node.start("py-eng", max_message_size=1024, max_depth=4,
                                     max_queue_bytes=4096) as py:
        # Nobody is connected to "elsewhere": its messages wait in the engine's queue.
        with pytest.raises(aemp.RefusedError) as e:
            await py.send("elsewhere#p", b"x" * 2000)
        assert e.value.kind == "too-large"
        with pytest.raises(aemp.RefusedError) as e:
            await py.send("elsewhere#p", [[[[1]]]])
        assert e.value.kind == "too-deep"
        with pytest.raises(aemp.RefusedError) as e:
            for _ in range(5):
                await py.send("elsewhere#p", b"x" * 1000)
        assert e.value.kind == "queue-full"
    async with await aemp.Node.start("py-budget", max_buffered_bytes=4096) as py:
        with pytest.raises(aemp.RefusedError) as e:
            for _ in range(5):
                await py.send("elsewhere#p", b"x" * 1000)
        assert e.value.kind == "budget-exhausted"
    for setting, bad in [("max_depth", 0), ("max_handshakes", 2**32), ("max_queue_bytes", -1)]:
        options: dict[str, Any] = {setting: bad}
        with pytest.raises(aemp.AempError, match=setting):
            await aemp.Node.start("py-bad-setting", **options)
