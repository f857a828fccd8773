"""A schema fuzz of the whole ``/openapi.json`` against a gateway serving the tiny demo model.

schemathesis generates valid and invalid requests for every documented operation (bodies, query
parameters, types, sizes) and checks each answer: no 5xx, no status the document does not list, the
documented content type and response schema. The model names are in the document (``enum``), so
generated requests reach the model and its runner, not only the 404 for unknown names.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from memserve.config import ModelConfig
from tests.gateway.test_gateway_process import GiB, gateway, host, settings_for

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_the_whole_document_fuzzed_gives_no_5xx_and_no_undocumented_status(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # a short context: a generated request without max_tokens generates at most this many tokens
    demo = ModelConfig(name="demo", source=str(tiny_model_dir), context_tokens=64, concurrency=2)
    settings = settings_for(tmp_path, [demo])
    with gateway(settings, host(4 * GiB)) as (origin, _):
        run = subprocess.run(
            [
                sys.executable,  # the module, not a script beside the interpreter: any venv layout runs it
                "-m",
                "schemathesis.cli",
                "run",
                f"{origin}/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                "8",
                "--seed",
                "11",
                "--no-color",
                "--request-timeout",
                "120",
                "--generation-database",
                "none",
                "--workers",
                "1",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]
