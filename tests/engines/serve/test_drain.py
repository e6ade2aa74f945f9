"""SIGTERM during load: requests in flight finish, new ones get 503, the process exits 0; and
every request left a JSON access-log line."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx


def test_sigterm_drains_in_flight_requests(serve_starter, tiny_model_dir):
    server = serve_starter(["--model", tiny_model_dir, "--device", "cpu", "--max-batch-size", "4",
                            "--max-queue", "8", "--drain-timeout", "30", "--batch-window-ms", "10"])
    try:
        body = {"prompt": "drain me", "max_tokens": 256, "n": 8, "temperature": 1.0}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, server.v1 + "/completions", json=body, timeout=60) for _ in range(4)]
            deadline = time.monotonic() + 10
            while httpx.get(server.url + "/health").json()["in_flight"] < 4:
                assert time.monotonic() < deadline, "the load never arrived"
                time.sleep(0.01)
            server.proc.send_signal(15)  # SIGTERM
            deadline = time.monotonic() + 10
            while (h := httpx.get(server.url + "/health")).status_code == 200:
                assert time.monotonic() < deadline, "the server never started draining"
                time.sleep(0.01)
            assert h.json()["status"] == "draining"
            late = httpx.post(server.v1 + "/completions", json={"prompt": "late", "max_tokens": 4})
            assert late.status_code == 503 and late.headers["retry-after"]
            assert late.json()["error"]["type"] == "service_unavailable"
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * 4
        assert all(len(a.json()["choices"]) == 8 for a in answers)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    access = [json.loads(line) for line in server.log if line.startswith('{"event": "access"')]
    posts = [a for a in access if a["path"] == "/v1/completions"]
    assert sorted(a["status"] for a in posts) == [200, 200, 200, 200, 503]
    assert all(a["duration_ms"] > 0 and a["request_id"] for a in posts)
