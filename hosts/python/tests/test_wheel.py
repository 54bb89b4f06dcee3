"""A wheel built by scripts/build-wheel installs into a clean virtual environment and runs
a node there, with no AEMP_WASM_DIR: the component comes from the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

SCRIPT = """
import asyncio, aemp
async def main():
    async with await aemp.Node.start("wheel-a", secret="s", binds=["127.0.0.1:0"]) as a, \\
            await aemp.Node.start("wheel-b", secret="s") as b:
        port = a.port("in")
        b.connect(a.listen_addrs[0])
        await b.send("wheel-a#in", "from the wheel")
        print((await port.recv())[0])
asyncio.run(main())
"""


def test_wheel_installs_and_runs() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([str(HERE / "scripts" / "build-wheel"), sys.executable],
                             check=True, capture_output=True, text=True).stdout
        wheel = out.split()[-1]
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True)
        python = str(env_dir / "bin" / "python")
        subprocess.run([python, "-m", "pip", "install", "-q", str(HERE / wheel)], check=True)
        env = {k: v for k, v in os.environ.items() if k != "AEMP_WASM_DIR"}
        run = subprocess.run([python, "-c", SCRIPT], cwd=tmp, env=env, check=True,
                             capture_output=True, text=True, timeout=60)
        assert run.stdout.strip() == "from the wheel"
