"""The HTML report: every plot is a real PNG and loads, and a headless Chromium (Debian's
``chromium``) renders a page that is not blank. Without Chromium the browser test says so and
skips; the parser-level check runs anyway. Also: the Markdown's readability promises (durations
with units, rows in the matrix's order, short strategy labels, the one-line answer)."""

from __future__ import annotations

import base64
import html.parser
import shutil
import subprocess
from pathlib import Path

import pytest

from natix.bench.html_report import render_html
from natix.bench.report import dur, render


def _row(scheme: str, engine: str, strategy: str, label: str, correct: list[bool], temp: float, n: int,
         batch: int, wall: float, tokens: int) -> dict:
    k = len(correct)
    return {"key": f"adapter/{scheme}/{engine}/kv=auto/b={batch}/T={temp:g}/{strategy}", "status": "ok",
            "settings": {"model": "m", "seed": 0, "items": k}, "variant": "adapter", "adapter": "demo",
            "scheme": scheme, "scheme_kind": scheme, "engine": engine, "kv": "auto", "kv_effective": "none",
            "batch_size": batch, "temperature": temp, "strategy": strategy, "label": label, "task": "chain_sum",
            "n_items": k, "accuracy": sum(correct) / k, "ci95": [0.1, 0.9], "coverage": 0.9, "coverage_k": n,
            "budget": n, "samples_spent_mean": float(n), "tokens_spent_mean": 40.0 * n,
            "cost": {"tokens_per_correct": 40.0 * n * k / max(1, sum(correct)), "device_s": wall,
                     "device_s_per_correct": wall / max(1, sum(correct))},
            "draw": {"n": n, "requests": k, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                     "requests_per_s": k / wall},
            "latency_s": {"p50": 462.084, "p90": 500.0, "p99": 510.0}, "ttft_s": {"p50": 0.8, "p99": 1.2},
            "tpot_s": {"p50": 0.021}, "itl_s": None, "per_item": {"ids": [str(i) for i in range(k)], "correct": correct},
            "env": {"device": "cpu", "torch": "2.13.0", "git_sha": "abc"}}


ROWS = [
    _row("none", "hf", "greedy", "greedy", [True, False, True, False], 0.0, 1, 8, 10.0, 160),
    _row("none", "hf", "maj@8", "maj@8", [True, True, True, False], 0.7, 8, 8, 40.0, 1280),
    _row("none", "hf", "adaptive@8:beta,threshold=0.95,round=2,min=1", "adaptive@8:beta", [True, True, False, False],
         0.7, 8, 8, 40.0, 1280),
    _row("fp8", "natix", "greedy", "greedy", [True, False, False, False], 0.0, 1, 16, 4.0, 160),
    _row("fp8", "natix", "maj@8", "maj@8", [True, True, False, True], 0.7, 8, 16, 20.0, 1280),
]


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs))


def _page(tmp_path: Path) -> Path:
    p = tmp_path / "report.html"
    p.write_text(render_html(ROWS, "test report", {"command": "natix-bench run --full"}), encoding="utf-8")
    return p


def test_every_plot_is_an_embedded_png(tmp_path: Path) -> None:
    text = _page(tmp_path).read_text()
    parser = _Images()
    parser.feed(text)
    plots = [i for i in parser.images if "plot" in i.get("class", "")]
    assert {i["id"] for i in plots} == {"plot-pareto", "plot-scaling", "plot-throughput"}
    for i in plots:
        assert i["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(i["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "natix-bench run --full" in text and "Environment" in text and "http" not in text.split("<body", 1)[1]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian package `chromium`; "
                                                "`.ci/run` installs it): only the parser-level check ran")
def test_chromium_renders_every_plot(tmp_path: Path) -> None:
    page = _page(tmp_path)
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert 'data-plots-loaded="3/3"' in dom.stdout, (dom.stdout[:300], dom.stderr[-2000:])
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1200
    assert pixels.std() > 0.05, "the screenshot is blank"  # a white page has std 0


def test_markdown_is_readable() -> None:
    text = render(ROWS, "t")
    assert "462084" not in text and "7m42s" in text  # durations carry units
    assert dur(0.0213) == "21 ms" and dur(4.25) == "4.2 s" and dur(3725) == "1h02m"
    body = text.split("latency and throughput")[0]
    order = [body.index(f"| {s} | {e} |") for s, e in (("none", "hf"), ("fp8", "natix"))]
    assert order == sorted(order)  # the matrix's order
    assert "| adaptive@8:beta |" in text and "`adaptive@8:beta` = `adaptive@8:beta,threshold=0.95" in text
    assert "Most correct answers per second here: **fp8 × greedy on natix batch 16** (0.25/s" in text
    assert "disjoint from the demo adapter's training data" in text
    no_demo = [{**r, "adapter": None, "variant": "model"} for r in ROWS]
    assert "disjoint" not in render(no_demo, "t")


def test_summary_is_one_line_and_a_compact_table() -> None:
    from natix.bench.report import summary

    text = summary(ROWS)
    first, _, table = text.partition("\n\n")
    assert first.startswith("Most correct answers per second here:")
    assert "| scheme | engine | batch | greedy | maj@8 | adaptive@8:beta |" in table
    assert "| none | hf | 8 | 50.0% (5.0 s) | 75.0% (13.3 s) | 50.0% (20.0 s) |" in table
    assert "| fp8 | natix | 16 | 25.0% (4.0 s) | 75.0% (6.7 s) | – |" in table


def test_rows_of_an_earlier_harness_still_render() -> None:
    from natix.bench.runner import load_cells

    rows = load_cells(Path(__file__).resolve().parents[2] / "reports" / "bench-adapter-160")
    assert rows and all(r["status"] == "ok" for r in rows)
    assert "earlier natix-bench" in render(rows, "t")
    assert "plot-scaling" in render_html(rows, "t")


def test_a_resumed_run_names_the_commits_of_its_cells() -> None:
    assert "commits" not in render(ROWS, "t")  # one commit: the Environment line says it
    later = [dict(r, env=dict(r["env"], git_sha="def456")) if r["scheme"] == "fp8" else r for r in ROWS]
    assert "Cells measured at 2 commits: `abc` (3 cells), `def456` (2 cells)." in render(later, "t")
