"""Running the JavaScript node (clients/js) from Python end-to-end tests against a real FedServer.

``echo_script`` builds a node that answers one task with a small document about the payload it received, then
prints a one-line JSON summary; ``js_node`` runs it as a process (stderr kept in a file, for the test's
messages) and kills it if the test ends first.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "clients" / "js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH: the JavaScript node cannot run")


def need_npm_deps() -> None:
    if not (JS / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/js/node_modules is missing: run (cd clients/js && npm ci)")


def echo_script(options: str, summary: str, reply: str = "{ format: 1, size: payload.length }",
                requires: str = "") -> str:
    """A JS node (NodeClient ``options`` beyond server, credentials, token, name and log, as JS source) that
    answers one task with ``reply`` (a JS expression of ``payload``), then prints ``summary`` (a JS expression
    of the client ``c``) as JSON and exits."""
    return f"""
const grpc = require("@grpc/grpc-js");
const {{ NodeClient }} = require("./src/wire/node_client.js");
const {{ encode }} = require("./src/codec");
{requires}
const args = JSON.parse(process.argv[1]);
const log = (level, msg) => process.stderr.write(`${{level}} ${{msg}}\\n`);
const c = new NodeClient({{ server: args.server, credentials: grpc.credentials.createInsecure(), token: args.token,
  nodeName: "js", log, {options} }});
const echo = {{ run: async (header, payload) => ({{ outcome: "TASK_OUTCOME_SUCCEEDED", errorMessage: "",
  payload: encode({reply}) }}) }};
c.run(echo, {{ maxTasks: 1 }}).then(() => {{
  console.log(JSON.stringify({summary}));
  c.close();
}}, (e) => {{ console.error(e); process.exit(1); }});
"""


class JsNode:
    """A running JS node process: its log so far, and its summary once it exits."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def summary(self, timeout: float = 20) -> Any:
        """Wait for the process to exit (status 0, else the test fails with its log); its last stdout line."""
        out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode == 0, self.log()
        return json.loads(out.decode().strip().splitlines()[-1])


@asynccontextmanager
async def js_node(script: str, server: str, token: str, log_path: Path) -> AsyncIterator[JsNode]:
    """Run ``script`` (see :func:`echo_script`) against ``server`` with ``token``; killed if still running after."""
    need_npm_deps()
    assert NODE is not None
    args = json.dumps({"server": server, "token": token})
    with log_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(NODE, "-e", script, args, cwd=JS,
                                                    stdout=asyncio.subprocess.PIPE, stderr=stderr)
    try:
        yield JsNode(proc, log_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
