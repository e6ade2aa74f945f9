"""``natix-bench compare RUN_A RUN_B``: the cells two runs share (same cell key), with the paired
accuracy difference B - A on the items both scored (same item ids) and B / A ratios of latency and
throughput. Cells only one run has are counted, not compared. Read only from the runs' JSONL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from natix.bench.report import _paired, dur, ok_rows


def _ratio(b: float | None, a: float | None) -> float | None:
    return b / a if a and b is not None else None


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    from natix.bench.matrix import BenchError
    from natix.bench.runner import load_cells

    ra, rb = ({r["key"]: r for r in ok_rows(load_cells(p))} for p in (a, b))
    for p, rows in ((a, ra), (b, rb)):
        if not rows:
            raise BenchError(f"{p} has no finished cells (cells.jsonl rows with status ok)")
    shared = [k for k in ra if k in rb]
    out = []
    for k in shared:
        x, y = ra[k], rb[k]
        d = _paired(y, x)
        n = len(set(x["per_item"]["ids"]) & set(y["per_item"]["ids"]))
        out.append({"key": k, "items": n, "accuracy_a": x["accuracy"], "accuracy_b": y["accuracy"], "diff": d,
                    "latency_p50_a": _p50(x), "latency_p50_b": _p50(y),
                    "latency_ratio": _ratio(_p50(y), _p50(x)),
                    "tokens_per_s_ratio": _ratio(y["draw"].get("tokens_per_s"), x["draw"].get("tokens_per_s")),
                    "cost_ratio": _ratio((y.get("cost") or {}).get("device_s_per_correct"),
                                         (x.get("cost") or {}).get("device_s_per_correct"))})
    return {"shared": out, "only_a": sorted(set(ra) - set(rb)), "only_b": sorted(set(rb) - set(ra))}


def _p50(r: dict[str, Any]) -> float | None:
    v = r.get("latency_s")
    return v.get("p50") if isinstance(v, dict) else v


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def render_comparison(c: dict[str, Any], name_a: str, name_b: str) -> str:
    lines = [f"A = {name_a}", f"B = {name_b}", ""]
    if not c["shared"]:
        lines.append("The runs share no cell (no common cell key): nothing to compare.")
    else:
        head = ["cell", "items", "acc A", "acc B", "B - A (pp) [95% CI]", "latency p50 A", "B", "B/A",
                "tok/s B/A", "time/correct B/A"]
        body = []
        for s in c["shared"]:
            d = s["diff"]
            dd = "–" if d is None else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]" + (
                " *" if d[1] > 0 or d[2] < 0 else "")
            body.append([s["key"], str(s["items"]), f"{100 * s['accuracy_a']:.1f}%", f"{100 * s['accuracy_b']:.1f}%", dd,
                         dur(s["latency_p50_a"]), dur(s["latency_p50_b"]), _x(s["latency_ratio"]),
                         _x(s["tokens_per_s_ratio"]), _x(s["cost_ratio"])])
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        for r in [head, ["-" * w for w in widths], *body]:
            lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        lines += ["", "* the paired 95% interval excludes zero. Differences are on the items both runs scored."]
    for name, keys in (("only in A", c["only_a"]), ("only in B", c["only_b"])):
        if keys:
            lines.append(f"{len(keys)} cell(s) {name}: " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
    return "\n".join(lines)
