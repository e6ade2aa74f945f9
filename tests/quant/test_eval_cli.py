"""``natix-quant eval``: perplexity (through the artifact's KV quantization) and task accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from natix.quant.cli import main


@pytest.fixture(scope="module")
def qoq_artifact(base_dirs, tmp_path_factory):
    from natix.quant.export import export
    from natix.quant.w4a8kv4_config import W4A8KV4Config

    root = tmp_path_factory.mktemp("eval")
    calib = root / "c.txt"
    calib.write_text(" ".join(f"w{4 + (i * 11) % 120}" for i in range(400)))
    return export(str(base_dirs["llama"]), W4A8KV4Config(gptq=False), root / "qoq", dtype="fp32", calib=str(calib),
                  calib_samples=4, calib_max_length=64).out


def test_perplexity_matches_a_direct_computation(base_dirs, tiny, tmp_path):
    from natix.quant.evaluate import perplexity

    model, tok = tiny.model("llama"), tiny.tokenizer()
    text = " ".join(f"w{4 + (i * 5) % 120}" for i in range(100))
    got = perplexity(model, tok, text, max_length=40)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), 40):
            w = torch.tensor([ids[i:i + 40]])
            logits = model(w).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
            n += w.shape[1] - 1
    assert got["tokens"] == n == 97 and got["windows"] == 3
    assert math.isclose(got["ppl"], math.exp(nll / n), rel_tol=1e-5)


def test_kv4_changes_perplexity_through_the_cache(qoq_artifact, tmp_path):
    """The artifact's int4 KV cache is in the loop: KV16 on the same weights gives another number."""
    from natix.quant.evaluate import perplexity
    from natix.quant.loader import load_artifact

    model, tok = load_artifact(qoq_artifact)
    text = " ".join(f"w{4 + (i * 3) % 120}" for i in range(120))
    kv4 = perplexity(model, tok, text, max_length=64)
    model.natix_kv_cache = "none"
    kv16 = perplexity(model, tok, text, max_length=64)
    assert kv4["kv_cache"] == "int4" and kv16["kv_cache"] == "none"
    assert kv4["ppl"] != kv16["ppl"] and abs(kv4["ppl"] / kv16["ppl"] - 1) < 0.2


def test_eval_cli_writes_a_jsonl_row(qoq_artifact, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text(" ".join(f"w{4 + (i * 7) % 120}" for i in range(150)))
    out = tmp_path / "rows.jsonl"
    r = CliRunner().invoke(main, ["eval", str(qoq_artifact), "--ppl", str(text), "--ppl-max-length", "64",
                                  "--task", "chain_sum", "--items", "2", "--strategy", "greedy", "--device", "cpu",
                                  "--jsonl", str(out), "--label", "qoq"])
    assert r.exit_code == 0, r.output
    row = json.loads(out.read_text())
    assert row["label"] == "qoq" and row["scheme"] == "w4a8kv4"
    assert row["perplexity"]["tokens"] == 147  # 150 tokens in windows of 64: 63 + 63 + 21 and row["perplexity"]["kv_cache"] == "int4"
    g = row["task"]["strategies"]["greedy"]
    assert g["items"] == 2 and 0.0 <= g["accuracy"] <= 1.0 and len(g["correct"]) == 2
    assert row["env"]["torch"]


def test_eval_cli_bad_text(qoq_artifact, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for path, msg in ((tmp_path / "missing.txt", "cannot read"), (empty, "is empty")):
        r = CliRunner().invoke(main, ["eval", str(qoq_artifact), "--ppl", str(path)])
        assert r.exit_code != 0 and msg in r.output, r.output
