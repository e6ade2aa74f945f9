"""merge_adapter: parity for every adapter type, and clear errors for adapters that do not fit."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from natix.quant.adapters import (
    FP32_REL_TOL,
    SUPPORTED_TYPES,
    AdapterError,
    MergeParityError,
    default_probe,
    merge_adapter,
    read_adapter,
)

KINDS = ("lora", "dora", "dora_embed", "lora_trainable_tokens", "rslora", "lora_modules_to_save", "adalora", "vera", "ia3", "loha", "lokr")
EXPECTED_TYPE = {"lora": "LORA", "dora": "LORA", "dora_embed": "LORA", "lora_trainable_tokens": "LORA", "rslora": "LORA", "lora_modules_to_save": "LORA",
                 "adalora": "ADALORA", "vera": "VERA", "ia3": "IA3", "loha": "LOHA", "lokr": "LOKR"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_parity_every_type(tiny, make_adapter, arch, kind):
    adapter = make_adapter(arch, kind)
    base = tiny.model(arch)
    probe = default_probe(base)
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
    merged, report = merge_adapter(tiny.model(arch), adapter)
    assert report.adapter_type == EXPECTED_TYPE[kind]
    assert report.parity_error is not None and report.parity_error <= FP32_REL_TOL
    assert report.targets, "report names the modules the adapter changes"
    # The adapter really changes the model, so the parity check above is not trivially met.
    with torch.no_grad():
        assert _rel(merged(input_ids=probe).logits, base_logits) > 1e-3
    assert not any("lora" in n or "ia3" in n or "hada" in n or "lokr" in n or "vera" in n
                   for n, _ in merged.named_parameters()), "adapter layers are gone after merging"
    print(f"parity {arch} {kind}: {report.parity_error:.2e}")  # shown with -s; recorded in the report


def test_report_details(tiny, make_adapter):
    merged, report = merge_adapter(tiny.model("qwen2"), make_adapter("qwen2", "lora"))
    assert report.variants == ()
    assert "model.embed_tokens" in report.targets and "lm_head" in report.targets
    assert "model.layers.1.mlp.down_proj" in report.targets
    assert report.untied_embeddings  # Qwen2 tiny ties them; the adapter touches both
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert json.dumps(report.to_dict())  # goes into the manifest
    _, dora = merge_adapter(tiny.model("llama"), make_adapter("llama", "dora"))
    assert dora.variants == ("dora",) and not dora.untied_embeddings


def test_merge_from_bin_weights_and_bf16_model(tiny, make_adapter):
    adapter = make_adapter("llama", "rslora", safe=False)
    assert (adapter / "adapter_model.bin").is_file()
    merged, report = merge_adapter(tiny.model("llama").to(torch.bfloat16), adapter)
    assert merged.dtype == torch.bfloat16  # merged in fp32, handed back in the caller's dtype
    assert report.parity_error <= FP32_REL_TOL and report.variants == ("rslora",)


def test_custom_probe_and_no_check(tiny, make_adapter):
    adapter = make_adapter("llama", "ia3")
    _, report = merge_adapter(tiny.model("llama"), adapter, probe_tokens=torch.tensor([[5, 6, 7]]))
    assert report.probe_shape == (1, 3)
    _, unchecked = merge_adapter(tiny.model("llama"), adapter, check=False)
    assert unchecked.parity_error is None


def test_parity_failure_is_loud(tiny, make_adapter, monkeypatch):
    """A merge that changes the function must raise, not pass silently."""
    from peft.tuners.lora import LoraModel

    adapter = make_adapter("llama", "lora")
    real = LoraModel.merge_and_unload

    def broken(self, *a, **kw):
        m = real(self, *a, **kw)
        with torch.no_grad():
            m.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        return m

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken)
    with pytest.raises(MergeParityError, match="relative error .* > tolerance"):
        merge_adapter(tiny.model("llama"), adapter)


# ---- adapters made for another base ------------------------------------------------------

@pytest.mark.parametrize(("kind", "other", "pattern"), [
    ("lora", dict(hidden=96), r"lm_head lora_A expects in_features 96 but base has 64"),
    ("rslora", dict(hidden=96),
     r"model\.layers\.0\.mlp\.down_proj lora_A expects in_features 192 but base has 128"),
    ("lora", dict(vocab=160), r"lm_head lora_B expects out_features 160 but base has 128"),
    ("dora_embed", dict(vocab=160), r"model\.embed_tokens lora_embedding_A expects num_embeddings 160 but base has 128"),
    ("adalora", dict(hidden=96), r"model\.layers\.0\.mlp\.down_proj lora_A expects in_features 192 but base has 128"),
    ("dora", dict(hidden=96), r"model\.layers\.0\.mlp\.down_proj lora_A expects in_features 192"),
    ("ia3", dict(hidden=96), r"model\.layers\.0\.mlp\.down_proj ia3_l \(feedforward\) has length 192 but base in_features is 128"),
    ("vera", dict(hidden=96), r"vera_lambda_b expects out_features 96 but base has 64"),
    ("loha", dict(hidden=96), r"down_proj hada_w1_a expects out_features 96 but base has 64"),
    ("lokr", dict(hidden=96), r"LoKr factors \(8, 12\)⊗\(12, 16\) give \(96, 192\) but base weight is \(64, 128\)"),
    ("lora", dict(layers=3), r"targets model\.layers\.2\.\w+\.\w+, which the base .*does not have"),
])
def test_adapter_for_another_base(tiny, make_adapter, kind, other, pattern):
    adapter = make_adapter("llama", kind, **other)
    base = tiny.model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterError, match="was made for another base") as err:
        merge_adapter(base, adapter)
    import re

    assert re.search(pattern, str(err.value)), str(err.value)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base untouched on error"


def test_adapter_for_smaller_base_is_refused(tiny, make_adapter):
    """Same shapes, fewer layers: peft would silently init the extra layers; we refuse."""
    adapter = make_adapter("llama", "lora", layers=1)
    with pytest.raises(AdapterError, match=r"targets model\.layers\.1\.\S+ in this base but .* no weights"):
        merge_adapter(tiny.model("llama"), adapter)


# ---- missing / corrupt / unsupported ----------------------------------------------------

def test_missing_config(make_adapter):
    adapter = make_adapter("llama", "lora")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        read_adapter(adapter)


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "nope")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"r": 4}'])
def test_unreadable_config(make_adapter, text):
    adapter = make_adapter("llama", "lora")
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        read_adapter(adapter)


def test_missing_weights(make_adapter):
    adapter = make_adapter("llama", "lora")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter weights are missing: expected .*adapter_model\.safetensors"):
        read_adapter(adapter)


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_safetensors(make_adapter, damage):
    adapter = make_adapter("llama", "lora")
    f = adapter / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors are corrupt or unreadable"):
        read_adapter(adapter)


def test_corrupt_bin(make_adapter):
    adapter = make_adapter("llama", "lora", safe=False)
    (adapter / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin are corrupt or unreadable"):
        read_adapter(adapter)


@pytest.mark.parametrize("which", ["prompt", "prefix"])
def test_unsupported_types(tiny, tmp_path, which):
    from peft import PrefixTuningConfig, PromptTuningConfig

    cfg = (PromptTuningConfig if which == "prompt" else PrefixTuningConfig)(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny.save(tiny.model("llama"), cfg, tmp_path / which)
    with pytest.raises(AdapterError) as err:
        merge_adapter(tiny.model("llama"), tmp_path / which)
    msg = str(err.value)
    assert ("PROMPT_TUNING" if which == "prompt" else "PREFIX_TUNING") in msg
    assert all(t in msg for t in SUPPORTED_TYPES), msg


# ---- the embedded model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from natix.quant.models import load_base

    return load_base("smollm2-135m", dtype="fp32")[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora", "dora_embed", "lora_trainable_tokens", "rslora",
                                  "lora_modules_to_save", "adalora", "vera", "ia3", "loha", "lokr"])
def test_smollm2_merge_parity_every_type(tmp_path, tiny, smollm2, kind):
    """Each supported adapter type, randomised, on the embedded SmolLM2 (tied embeddings, GQA)."""
    import copy

    adapter = tiny.save(copy.deepcopy(smollm2), tiny.config(kind), tmp_path / kind)
    base = copy.deepcopy(smollm2)
    probe = default_probe(base, batch=2, length=24)
    merged, report = merge_adapter(base, adapter, probe_tokens=probe)
    print(f"parity smollm2 {kind}: {report.parity_error:.2e}")
    assert report.parity_error <= FP32_REL_TOL
    assert report.targets
