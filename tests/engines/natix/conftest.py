"""Fixtures for the natix engine tests: tiny random Llama / Qwen2 / Mistral directories and engines."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_arch_dirs(tmp_path_factory, tiny_llama_builder, model_dir_saver):
    """{"llama": dir, "qwen2": dir (qkv bias), "mistral": dir}: 2 layers, hidden 64, GQA 4/2, head_dim 16."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("natix-archs")
    out = {"llama": tiny_llama_builder(root / "llama", hidden=64)}
    tok = AutoTokenizer.from_pretrained(out["llama"])  # the char-level tokenizer of tests/engines/conftest.py
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3,
                  tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for name, cfg_cls, model_cls in (("qwen2", Qwen2Config, Qwen2ForCausalLM),
                                     ("mistral", MistralConfig, MistralForCausalLM)):
        torch.manual_seed(1)
        extra = {"sliding_window": None} if name == "mistral" else {}
        model = model_cls(cfg_cls(**common, **extra)).eval()
        if name == "qwen2":
            with torch.no_grad():  # make the q/k/v biases matter
                for layer in model.model.layers:
                    for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        p.bias.normal_(0, 0.5)
        out[name] = model_dir_saver(model, tok, root / name)
    return out


@pytest.fixture(scope="session")
def natix_factory():
    """natix_factory(model_dir, **extra) -> a loaded natix engine (closed at session end)."""
    from natix.engines.base import EngineConfig, create_engine

    made = []

    def make(model: str, adapter: str | None = None, **extra):
        e = create_engine("natix")
        e.load(EngineConfig(model=str(model), adapter=adapter, extra=extra))
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()
