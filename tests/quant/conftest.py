"""Tiny random-weight models, a tiny tokenizer and random PEFT adapters of every mergeable type.

Everything is built in code (no hub): Llama with untied embeddings and Qwen2 with tied ones (so
the untie-before-merge path is exercised). Adapters are perturbed after creation because peft
initialises most of them to a no-op (LoRA B = 0, IA3 = 1, ...), which would make parity trivial.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

VOCAB = 128
ARCHS = ("llama", "qwen2")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(arch: str, hidden: int = 64, layers: int = 2, vocab: int = VOCAB):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                  max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **common)
    return Qwen2Config(tie_word_embeddings=True, **common)


def tiny_model(arch: str, seed: int = 0, **kw):
    """A fresh tiny causal LM; same ``arch``/``seed``/``kw`` -> same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(arch, **kw), dtype=torch.float32).eval()


def tiny_tokenizer():
    """A WordLevel tokenizer over ``VOCAB`` ids (w0, w1, ...), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def adapter_config(kind: str):
    """peft config for adapter ``kind`` (one per supported type / LoRA variant)."""
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    configs = {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR + ["embed_tokens", "lm_head"],
                                   init_lora_weights=False),
        "dora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                   use_dora=True, init_lora_weights=False),
        "dora_embed": lambda: LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True,
                                         init_lora_weights=False),
        "lora_trainable_tokens": lambda: LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                    trainable_token_indices={"embed_tokens": [4, 5, 6, 7]}),
        "rslora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR, use_rslora=True,
                                     init_lora_weights=False),
        "lora_modules_to_save": lambda: LoraConfig(r=4, target_modules=["o_proj"], modules_to_save=["lm_head"],
                                                   init_lora_weights=False),
        "adalora": lambda: AdaLoraConfig(init_r=6, target_r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                         total_step=10),
        "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]),
        "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": lambda: LoHaConfig(r=4, alpha=4, target_modules=["q_proj", "gate_proj", "down_proj"]),
        "lokr": lambda: LoKrConfig(r=4, alpha=4, target_modules=["q_proj", "gate_proj", "down_proj"]),
    }
    return configs[kind]()


ADAPTER_KINDS = ("lora", "dora", "dora_embed", "lora_trainable_tokens", "rslora", "lora_modules_to_save", "adalora", "vera", "ia3", "loha", "lokr")


def save_random_adapter(model, peft_config, out: Path, *, safe: bool = True, seed: int = 1) -> Path:
    """Wrap ``model`` with ``peft_config``, perturb every trainable tensor, save to ``out``."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, peft_config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
        pm.save_pretrained(out, safe_serialization=safe)
    return out


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """``make_adapter(arch, kind, **model_kw)`` -> adapter dir made on ``tiny_model(arch, **model_kw)``."""

    def make(arch: str, kind: str, *, name: str | None = None, safe: bool = True, **model_kw) -> Path:
        out = tmp_path / (name or f"adapter-{arch}-{kind}")
        return save_random_adapter(tiny_model(arch, **model_kw), adapter_config(kind), out, safe=safe)

    return make


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models + tokenizer saved as HF directories, one per arch, for the CLI."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for arch in ARCHS:
        d = root / arch
        tiny_model(arch).save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def tiny():
    """The builders above, for test modules (conftest is not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(model=tiny_model, tokenizer=tiny_tokenizer, config=adapter_config,
                                 save=save_random_adapter, kinds=ADAPTER_KINDS, linear=LINEAR)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box the intra-op thread
    hand-off can cost ~1000x (measured: 64x64 linear x1000, 0.02 s on 1 thread, 16 s on 2 under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def wide_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose every in_features is a multiple of 128 (hidden 128, MLP 256), as an HF dir."""
    d = tmp_path_factory.mktemp("wide") / "llama128"
    tiny_model("llama", hidden=128).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 calibration rows of 32 tiny-vocabulary words, as a .jsonl."""
    import json

    p = tmp_path_factory.mktemp("calib") / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": " ".join(f"w{4 + (i * 13 + j * 7) % 120}" for j in range(32))})
                           for i in range(8)) + "\n")
    return p


def generate_from(model_dir: Path, max_tokens: int = 4):
    """Load ``model_dir`` in the hf engine on CPU and generate from one prompt; the completion."""
    from natix.engines.base import EngineConfig, SamplingSpec, create_engine

    eng = create_engine("hf")
    eng.load(EngineConfig(model=str(model_dir), device="cpu"))
    try:
        (res,) = eng.generate(["w5 w6 w7"], SamplingSpec(max_tokens=max_tokens))
        return res[0]
    finally:
        eng.close()


@pytest.fixture(scope="session")
def hf_generate():
    """:func:`generate_from`, for test modules."""
    return generate_from
