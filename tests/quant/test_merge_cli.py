"""`natix-quant merge`: writes a loadable merged model atomically; every bad input fails cleanly."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from natix.quant.adapters import SUPPORTED_TYPES, default_probe
from natix.quant.artifact import MANIFEST_NAME
from natix.quant.cli import main

KINDS = ("lora", "dora", "dora_embed", "lora_trainable_tokens", "rslora", "lora_modules_to_save", "adalora", "vera", "ia3", "loha", "lokr")


def _merge(*args: str | Path):
    return CliRunner().invoke(main, ["merge", *map(str, args)], catch_exceptions=False)


def _unmerged_logits(base_dir: Path, adapter: Path, probe: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        pm = PeftModel.from_pretrained(model, adapter).eval()
        with torch.no_grad():
            return pm(input_ids=probe).logits


def _assert_clean(parent: Path, out: Path, expected: set[str] | None = None) -> None:
    """No output directory, and no temp leftovers beside it."""
    assert not out.exists()
    leftovers = {p.name for p in parent.iterdir()} - (expected or set())
    assert not leftovers, leftovers


@pytest.fixture
def out_root(tmp_path: Path) -> Path:
    d = tmp_path / "outputs"
    d.mkdir()
    return d


@pytest.mark.parametrize("kind", KINDS)
def test_merge_writes_loadable_model(base_dirs, make_adapter, out_root, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter("llama", kind)
    out = out_root / "merged"
    res = _merge("--base", base_dirs["llama"], "--adapter", adapter, "--out", out)
    assert res.exit_code == 0, res.output
    assert "merged" in res.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", MANIFEST_NAME, "tokenizer.json"} <= names
    assert {p.name for p in out_root.iterdir()} == {"merged"}

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    probe = default_probe(merged)
    with torch.no_grad():
        got = merged(input_ids=probe).logits
    want = _unmerged_logits(base_dirs["llama"], adapter, probe)
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert AutoTokenizer.from_pretrained(out)("w5 w6")["input_ids"] == [5, 6]

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["scheme"] == "merged" and manifest["dtype"] == "fp32"
    assert manifest["adapter"]["type"] == manifest["details"]["merge"]["adapter_type"]
    assert len(manifest["base"]["sha256"]) == 64 and len(manifest["adapter"]["sha256"]) == 64
    assert manifest["details"]["merge"]["parity_error"] < 1e-4


def test_merge_bf16_tied_qwen2(base_dirs, make_adapter, out_root):
    """Tied embeddings + LoRA on embed_tokens and lm_head: saved untied, in bf16."""
    from transformers import AutoModelForCausalLM

    adapter = make_adapter("qwen2", "lora")
    out = out_root / "merged"
    res = _merge("--base", base_dirs["qwen2"], "--adapter", adapter, "--out", out, "--dtype", "bf16")
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16 and not merged.config.tie_word_embeddings
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    probe = default_probe(merged)
    with torch.no_grad():
        got = merged.float()(input_ids=probe).logits
    want = _unmerged_logits(base_dirs["qwen2"], adapter, probe)
    assert float((got - want).norm() / want.norm()) < 2e-2  # bf16 weight rounding only


def test_force_replaces(base_dirs, make_adapter, out_root):
    out = out_root / "merged"
    a1, a2 = make_adapter("llama", "lora"), make_adapter("llama", "ia3")
    assert _merge("--base", base_dirs["llama"], "--adapter", a1, "--out", out).exit_code == 0
    res = _merge("--base", base_dirs["llama"], "--adapter", a2, "--out", out)
    assert res.exit_code != 0 and "already exists" in res.stderr and "--force" in res.stderr
    assert json.loads((out / MANIFEST_NAME).read_text())["adapter"]["type"] == "LORA"
    # a failing --force run keeps the old output
    bad = out_root.parent / "bad"
    shutil.copytree(a2, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"junk")
    res = _merge("--base", base_dirs["llama"], "--adapter", bad, "--out", out, "--force")
    assert res.exit_code != 0
    assert json.loads((out / MANIFEST_NAME).read_text())["adapter"]["type"] == "LORA"
    res = _merge("--base", base_dirs["llama"], "--adapter", a2, "--out", out, "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((out / MANIFEST_NAME).read_text())["adapter"]["type"] == "IA3"
    assert {p.name for p in out_root.iterdir()} == {"merged"}


def _break(adapter: Path, how: str) -> None:
    if how == "no-config":
        (adapter / "adapter_config.json").unlink()
    elif how == "bad-json":
        (adapter / "adapter_config.json").write_text("{oops")
    elif how == "no-weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif how == "corrupt-weights":
        (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64)


@pytest.mark.parametrize(("how", "message"), [
    ("no-config", r"adapter_config.json is missing"),
    ("bad-json", r"cannot read .*adapter_config.json"),
    ("no-weights", r"adapter weights are missing: expected .*adapter_model.safetensors"),
    ("corrupt-weights", r"adapter_model.safetensors are corrupt or unreadable"),
])
def test_bad_adapter_files(base_dirs, make_adapter, out_root, how, message):
    adapter = make_adapter("llama", "lora")
    _break(adapter, how)
    out = out_root / "merged"
    res = _merge("--base", base_dirs["llama"], "--adapter", adapter, "--out", out)
    assert res.exit_code != 0
    assert pytest.importorskip("re").search(message, res.stderr), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    _assert_clean(out_root, out)


def test_adapter_for_another_base(base_dirs, make_adapter, out_root):
    adapter = make_adapter("llama", "lora", hidden=96)  # same arch, wider model
    out = out_root / "merged"
    res = _merge("--base", base_dirs["llama"], "--adapter", adapter, "--out", out)
    assert res.exit_code != 0
    assert "was made for another base" in res.stderr
    assert "lora_A expects in_features 96 but base has 64" in res.stderr
    _assert_clean(out_root, out)


def test_adapter_for_another_arch(base_dirs, make_adapter, out_root):
    adapter = make_adapter("qwen2", "rslora", hidden=96)
    out = out_root / "merged"
    res = _merge("--base", base_dirs["llama"], "--adapter", adapter, "--out", out)
    assert res.exit_code != 0 and "was made for another base" in res.stderr
    _assert_clean(out_root, out)


def test_unsupported_adapter_type(base_dirs, tiny, tmp_path, out_root):
    from peft import PromptTuningConfig

    adapter = tiny.save(tiny.model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                        tmp_path / "prompt")
    out = out_root / "merged"
    res = _merge("--base", base_dirs["llama"], "--adapter", adapter, "--out", out)
    assert res.exit_code != 0 and "PROMPT_TUNING" in res.stderr
    assert all(t in res.stderr for t in SUPPORTED_TYPES)
    _assert_clean(out_root, out)


def test_unknown_dtype(base_dirs, make_adapter, out_root):
    out = out_root / "merged"
    res = _merge("--base", base_dirs["llama"], "--adapter", make_adapter("llama", "lora"), "--out", out,
                 "--dtype", "int3")
    assert res.exit_code == 2 and "--dtype" in res.stderr and "int3" in res.stderr
    _assert_clean(out_root, out)


def test_missing_base(make_adapter, out_root, tmp_path):
    out = out_root / "merged"
    res = _merge("--base", tmp_path / "no-such-model", "--adapter", make_adapter("llama", "lora"), "--out", out)
    assert res.exit_code != 0 and "no-such-model" in res.stderr and "not found" in res.stderr
    _assert_clean(out_root, out)


def test_interrupt_leaves_nothing(base_dirs, make_adapter, out_root, monkeypatch):
    """Ctrl-C while saving: the temp directory is removed, no output appears."""
    from transformers import PreTrainedTokenizerFast

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    out = out_root / "merged"
    res = CliRunner().invoke(main, ["merge", "--base", str(base_dirs["llama"]), "--adapter",
                                    str(make_adapter("llama", "lora")), "--out", str(out)])
    assert res.exit_code != 0
    _assert_clean(out_root, out)


def test_help_lists_group():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "merge" in res.output
