"""The agent's per-request metrics: plain numbers, rendered as Prometheus families on scrape."""

from __future__ import annotations

import re

import pytest

from fnmesh.agent import metrics as metrics_mod
from fnmesh.agent.metrics import AgentMetrics


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if have == labels:
            return float(m.group(3))
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def test_histograms_count_each_value_in_its_bucket_and_every_bucket_above() -> None:
    m = AgentMetrics("n1")
    for rows, ms in ((1, 0.1), (3, 0.3), (64, 7.0), (300, 9000.0)):
        m.batch("ns/f", rows, ms, cold=rows == 1, inline=rows == 3)
    text = m.render().decode()
    le = {"1.0": 1, "2.0": 1, "4.0": 2, "64.0": 3, "256.0": 3, "+Inf": 4}
    for bound, n in le.items():
        assert sample(text, "fnmesh_agent_batch_rows_bucket", function="ns/f", le=bound) == n
    assert sample(text, "fnmesh_agent_batch_rows_sum", function="ns/f") == 368
    assert sample(text, "fnmesh_agent_batch_rows_count", function="ns/f") == 4
    # A value equal to a bound falls in that bucket (Prometheus' "le").
    assert sample(text, "fnmesh_agent_batch_run_ms_bucket", function="ns/f", le="0.1") == 1
    assert sample(text, "fnmesh_agent_batch_run_ms_bucket", function="ns/f", le="5000.0") == 3
    assert sample(text, "fnmesh_agent_cold_starts_total", function="ns/f") == 1
    assert sample(text, "fnmesh_agent_inline_batches_total", function="ns/f") == 1


def test_answers_by_function_and_code_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "MAX_ANSWER_LABELS", 3)
    m = AgentMetrics("n1")
    m.answer("ns/a", "ok")
    m.answer("ns/a", "ok")
    m.answer("ns/a", "bad_request")
    for i in range(5):  # topics can name anything: these must not grow the metrics
        m.answer(f"junk/{i}", "not_found")
    m.answer("ns/a", "ok")  # a label set already known keeps counting
    text = m.render().decode()
    assert sample(text, "fnmesh_agent_answers_total", function="ns/a", code="ok") == 3
    assert sample(text, "fnmesh_agent_answers_total", function="ns/a", code="bad_request") == 1
    assert sample(text, "fnmesh_agent_answers_total", function="junk/0", code="not_found") == 1
    assert sample(text, "fnmesh_agent_answers_total", function="other", code="not_found") == 4
    assert "junk/1" not in text
