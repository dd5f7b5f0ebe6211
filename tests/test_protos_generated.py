"""The committed generated code must be what scripts/gen_protos.py produces from protos/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_generated_modules_import_without_grpc_stubs() -> None:
    from fedstream.v1 import common_pb2, node_service_pb2

    header = common_pb2.PayloadHeader(total_size=5, sha256=b"\0" * 32, chunk_size=4, chunk_count=2)
    msg = node_service_pb2.PollTaskResponse(task=node_service_pb2.TaskHeader(task_id="t", payload=header))
    assert node_service_pb2.PollTaskResponse.FromString(msg.SerializeToString()) == msg
