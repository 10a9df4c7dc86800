"""The CPU subset of the API fuzz campaign (scripts/fuzz_api.py --subset ci) against one tiny server: every reply a
2xx with a valid body or a 4xx with a message, the cases that must be refused refused, a well-formed greedy stream
running throughout with tokens equal to the same request alone, the server alive and its idle pool-leak check
silent at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import fuzz_api  # noqa: E402

pytestmark = pytest.mark.server


def test_fuzz_campaign_ci_subset(start_server, tiny_dir, tmp_path):
    server = start_server(tiny_dir(flat=True))
    out = tmp_path / "fuzz.json"
    rc = fuzz_api.main(["--url", server.url, "--server-log", str(server.log_path), "--subset", "ci",
                        "--stream-tokens", "16", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, fuzz_api.summary(res)
    expected = [c for c in fuzz_api.build_cases(res["model"]) if c.ci]
    assert res["cases"] == len(expected) and not res["failures"]
    # the campaign covers the three endpoints and the kinds of issue 8
    assert set(res["by_endpoint"]) == set(fuzz_api.ENDPOINTS)
    assert {"token_ids", "empty", "types", "sampling", "logprobs", "embeds", "grammar", "chat"} <= set(res["by_kind"])
    rejected = {r["name"] for r in res["results"] if r["outcome"] == "rejected"}
    assert {"input_ids with 999999", "batch with an empty prompt in the middle"} <= rejected
    s = res["stream"]
    assert s["runs_during"] >= 1 and s["runs_during_equal_alone"] == s["runs_during"] and s["after_equal_before"]
    assert res["alive"] and res["leak_lines"] == []
    assert server.proc.poll() is None
