"""Server memory of a FedAvg round on a big model: global model + one sum + one upload, nothing per reply.

``scripts/bench_big_model.py`` runs the 600M-parameter (2.4 GB) figure; here the same script runs a
25M-parameter (100 MB) round with 2 node processes, uploads received one at a time
(``max_upload_buffer_bytes`` = one model) and ``FedAverage(accumulator="param_dtype")``: the server's peak
RSS above its idle RSS must stay near 3 models (4 if an upload buffer were kept after accumulation, or
the sum were float64, or both uploads were buffered at once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = 25_000_000


def test_a_big_model_round_holds_about_three_models_on_the_server(tmp_path: Path) -> None:
    out = tmp_path / "big.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_big_model.py"), "--params", str(PARAMS),
           "--upload-buffer", str(4 * PARAMS), "--timeout", "120", "--json", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["aggregated"] == 2  # and the script checked the averaged values
    above_idle = (result["server_peak_rss_gb"] - result["server_idle_rss_gb"]) / result["model_gb"]
    assert above_idle < 4.0, result  # measured 3.24-3.62 at 25M under load; guards against a 5th model copy
