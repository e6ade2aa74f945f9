"""natix.engines.streaming.coalesce: what a server that fell behind the engine sends in one event."""
from __future__ import annotations

from natix.engines.streaming import RequestDelta, coalesce


def test_coalesce_merges_each_samples_waiting_deltas_in_order():
    a0 = RequestDelta("a", 0, (1,), (-0.1,), "x", top_logprobs=({1: -0.1},))
    b0 = RequestDelta("b", 0, (7,), None, "q")
    a1 = RequestDelta("a", 1, (5,), (-0.5,), "z")
    a0b = RequestDelta("a", 0, (2, 3), (-0.2, -0.3), "yy", top_logprobs=({2: -0.2}, {3: -0.3}))
    b0b = RequestDelta("b", 0, (8,), None, "r", finish_reason="stop")
    out = coalesce([a0, b0, a1, a0b, b0b])
    assert [(d.request_id, d.index) for d in out] == [("a", 0), ("b", 0), ("a", 1)]
    a, b, a_1 = out
    assert a.token_ids == (1, 2, 3) and a.logprobs == (-0.1, -0.2, -0.3) and a.text == "xyy"
    assert a.top_logprobs == ({1: -0.1}, {2: -0.2}, {3: -0.3}) and not a.finished
    assert b.token_ids == (7, 8) and b.logprobs is None and b.text == "qr" and b.finish_reason == "stop"
    assert a_1 is a1
    assert coalesce([]) == [] and coalesce([a0]) == [a0]
