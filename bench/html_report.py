"""The self-contained HTML report: the Markdown report's tables plus matplotlib plots embedded as PNG
data URIs (one file, opens anywhere, no network). Rendered only from the JSONL rows and the run's
matrix.json, like the Markdown.

Plots: the Pareto frontier of time per correct answer against accuracy over every cell; accuracy
against samples spent per strategy family, with coverage (pass@k) beside it; throughput against
batch size (rows in flight) per engine and scheme. The page marks itself
``data-plots-loaded="N/M"`` once its images have decoded, which the headless-browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any, Sequence

from natix.bench.report import (_EXPLAIN, Table, _draw_key, _scheme, answer, canonical_specs, errors, exclusions,
                                intro, ok_rows, per_second, tables)

_MARKERS = "osD^vP*X"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _family(strategy: str) -> str:
    """``maj@8`` -> ``maj``, ``bo8:verifier`` -> ``bo:verifier``, ``adaptive@16:beta,...`` -> ``adaptive:beta``."""
    m = re.match(r"([a-z_]+)@?(\d+)?(?::([a-z_]+))?", strategy)
    if not m:
        return strategy
    name, _, opt = m.groups()
    return f"{name}:{opt}" if opt and name in ("bo", "adaptive", "wmaj") else name


def _plain_ticks(axis: Any) -> None:
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(NullFormatter())


def pareto_plot(rows: Sequence[dict[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    pts = [r for r in ok_rows(rows) if per_second(r)]
    if not pts:
        return None
    schemes = list(dict.fromkeys(_scheme(r) for r in pts))
    engines = list(dict.fromkeys(r["engine"] for r in pts))
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in pts:
        x = r["cost"]["device_s_per_correct"]
        ax.scatter(x, 100 * r["accuracy"], color=colors(schemes.index(_scheme(r)) % 10),
                   marker=_MARKERS[engines.index(r["engine"]) % len(_MARKERS)], s=46, alpha=0.85)
    # frontier: no other cell is both cheaper and at least as accurate
    front = sorted(pts, key=lambda r: (r["cost"]["device_s_per_correct"], -r["accuracy"]))
    best, line = -1.0, []
    for r in front:
        if r["accuracy"] > best:
            best = r["accuracy"]
            line.append(r)
    ax.step([r["cost"]["device_s_per_correct"] for r in line], [100 * r["accuracy"] for r in line], where="post",
            color="black", lw=1, alpha=0.6, label="Pareto frontier")
    for r in line:
        ax.annotate(f"{r.get('scheme', 'none')} {r.get('label') or r['strategy']}",
                    (r["cost"]["device_s_per_correct"], 100 * r["accuracy"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    for i, s in enumerate(schemes):
        ax.scatter([], [], color=colors(i % 10), marker="o", label=f"scheme {s}")
    for i, e in enumerate(engines):
        ax.scatter([], [], color="grey", marker=_MARKERS[i % len(_MARKERS)], label=f"engine {e}")
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("time per correct answer (device-seconds, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs cost per correct answer, every cell")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def scaling_plot(rows: Sequence[dict[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    ok = ok_rows(rows)
    panels = list(dict.fromkeys((r["variant"], _scheme(r), r["engine"]) for r in ok))
    if not ok:
        return None
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.3 * nrows), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (v, s, e) in zip(axes.flat, panels):
        cell = [r for r in ok if (r["variant"], _scheme(r), r["engine"]) == (v, s, e)]
        fams = list(dict.fromkeys(_family(r["strategy"]) for r in cell))
        for i, f in enumerate(fams):
            pts = sorted((r for r in cell if _family(r["strategy"]) == f), key=lambda r: r["samples_spent_mean"])
            ax.plot([r["samples_spent_mean"] for r in pts], [100 * r["accuracy"] for r in pts], marker="o",
                    color=colors(i % 10), label=f)
            ax.plot([r["coverage_k"] for r in pts], [100 * r["coverage"] for r in pts], ls="--", marker="x",
                    color=colors(i % 10), alpha=0.6)
        ax.set_title(f"{v} / {s} / {e}", fontsize=8)
        ax.set_xscale("log", base=2)
        _plain_ticks(ax.xaxis)
        ax.set_xlabel("samples per item")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("accuracy (solid) / coverage (dashed), %")
    fig.suptitle("Accuracy vs samples spent, coverage (pass@k) beside it", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def throughput_plot(rows: Sequence[dict[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    draws: dict[tuple, dict[str, Any]] = {}
    for r in ok_rows(rows):
        draws.setdefault((*_draw_key(r), r["temperature"]), r)
    if not draws:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in draws.values():
        if r["draw"].get("tokens_per_s"):
            kind = "greedy" if not r["temperature"] else f"T={r['temperature']:g} n={r['draw']['n']}"
            series.setdefault((r["engine"], _scheme(r), kind), []).append(
                (r.get("batch_size") or 0, r["draw"]["tokens_per_s"]))
    if not series:
        plt.close(fig)
        return None
    sizes = {b for pts in series.values() for b, _ in pts}
    if len(sizes) > 1:
        for i, (label, pts) in enumerate(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[i % len(_MARKERS)],
                    label=" / ".join(label))
        ax.set_xscale("log", base=2)
        _plain_ticks(ax.xaxis)
        ax.set_xlabel("batch size (rows in flight)")
        ax.legend(fontsize=7)
    else:  # one batch size: a bar per engine / scheme / draw
        labels = [" / ".join(k) for k in series]
        ax.barh(labels, [pts[0][1] for pts in series.values()], color="tab:blue")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel(f"generated tokens / s at batch size {next(iter(sizes))} (the matrix has one batch size)")
    ax.set_ylabel("generated tokens / s" if len(sizes) > 1 else "")
    ax.set_title("Throughput vs concurrency, per engine and scheme")
    ax.grid(alpha=0.3)
    return _png(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f3f3f3}td:nth-child(-n+6){text-align:left}img{max-width:100%;display:block;
margin:1em 0}.answer{font-size:1.1em;background:#eef6ee;padding:.6em;border-left:4px solid #4a4}
pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}"""

_ONLOAD = """<script>
function natixPlots(){var im=[].slice.call(document.querySelectorAll('img.plot'));
var ok=im.filter(function(i){return i.complete&&i.naturalWidth>0}).length;
document.body.setAttribute('data-plots-loaded', ok+'/'+im.length);}
window.addEventListener('load', natixPlots);
</script>"""


def _md_inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_md_inline(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    note = f"<p>{_md_inline(t.note)}</p>" if t.note else ""
    return f"<h2>{_md_inline(t.title)}</h2><table><tr>{head}</tr>{body}</table>{note}"


def render_html(rows: Sequence[dict[str, Any]], title: str, matrix: dict[str, Any] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    rows = list(rows)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style>{_ONLOAD}</head><body data-plots-loaded='0/0'><h1>{html.escape(title)}</h1>"]
    if not rows:
        return "".join(parts) + "<p>No cells yet.</p></body></html>"
    parts.append("".join(f"<p>{_md_inline(x)}</p>" for x in intro(rows, matrix) if not x.startswith("Reproduce")))
    parts.append(f"<p class='answer'>{_md_inline(answer(rows))}</p>")
    for name, fn in (("pareto", pareto_plot), ("scaling", scaling_plot), ("throughput", throughput_plot)):
        png = fn(rows)
        if png:
            parts.append(f"<img class='plot' id='plot-{name}' alt='{name} plot' src='data:image/png;base64,{png}'>")
    parts.append(f"<p>{_md_inline(_EXPLAIN)}</p>")
    parts += [_table(t) for t in tables(rows)]
    specs = canonical_specs(rows)
    if specs:
        parts.append("<p>Strategy specs in full: " + "; ".join(
            f"<code>{html.escape(a)}</code> = <code>{html.escape(b)}</code>" for a, b in specs) + "</p>")
    for heading, items in (("Cells that cannot exist", exclusions(rows)), ("Cells that failed", errors(rows))):
        if items:
            parts.append(f"<h2>{heading}</h2><ul>" + "".join(
                f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in items) + "</ul>")
    env = (ok_rows(rows) or rows)[0].get("env") or {}
    parts.append("<h2>Environment</h2><pre>" + html.escape("\n".join(f"{k}: {v}" for k, v in env.items())) + "</pre>")
    if matrix and matrix.get("command"):
        parts.append(f"<h2>Reproduce</h2><pre>{html.escape(matrix['command'])}</pre>")
    return "".join(parts) + "</body></html>"
