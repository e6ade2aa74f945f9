"""The calibrated sequential pipeline (natix.quant.calibrate) and calibration data (natix.quant.calib)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from natix.quant.calib import CalibrationError, check_source, heldout_text, load_calibration
from natix.quant.calibrate import capture_block_inputs, decoder_layers, quantize_sequential
from natix.quant.schemes import QuantConfig


class _Recorder(nn.Module):
    """Stands in for a quantized Linear: the same function, plus a record of the Hessian it got."""

    def __init__(self, lin: nn.Linear, hessian: torch.Tensor | None, scale: float) -> None:
        super().__init__()
        self.lin, self.hessian, self.scale = lin, hessian, scale
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale

    def layer_meta(self) -> dict:
        return {}


@dataclass(frozen=True)
class _Probe(QuantConfig):
    """A test scheme: 'quantizing' multiplies a layer's output by ``scale`` (1.0: identity)."""

    version: int = 1
    scale: float = 1.0
    ignore: tuple = ("lm_head",)

    def needs_calibration(self) -> bool:
        return True

    def quantize_linear(self, linear, *, name="", hessian=None):
        return _Recorder(linear, hessian, self.scale)


def _samples(n=3, lengths=(5, 9, 7), vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_identity_scheme_preserves_the_model_and_hessians_are_exact(tiny, arch):
    model = tiny.model(arch)
    ref = tiny.model(arch)
    samples = _samples()
    # Reference Hessians from hooks on the untouched model: 2/n sum x x^T over all tokens
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def f(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in ref.named_modules()
          if type(m) is nn.Linear and n != "lm_head"]
    with torch.no_grad():
        ref_logits = [ref(torch.tensor([s])).logits for s in samples]
    for h in hs:
        h.remove()

    quantized, skipped = quantize_sequential(model, _Probe(), samples)
    assert skipped == ["lm_head"]
    assert len(quantized) == 2 * 7
    for name in quantized:
        got = model.get_submodule(name).hessian
        want = sums[name] * 2 / counts[name]
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), name
    # q/k/v read one tensor: one shared accumulator; o_proj reads another
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.hessian is attn.k_proj.hessian is attn.v_proj.hessian
    assert attn.o_proj.hessian is not attn.q_proj.hessian
    mlp = model.model.layers[1].mlp
    assert mlp.gate_proj.hessian is mlp.up_proj.hessian is not mlp.down_proj.hessian
    with torch.no_grad():
        for s, want in zip(samples, ref_logits):
            assert torch.allclose(model(torch.tensor([s])).logits, want, atol=1e-5)


def test_later_layers_are_calibrated_on_quantized_outputs(tiny):
    """With a scheme that changes layer 0's outputs, layer 1's Hessians must see the change."""
    samples = _samples()
    a, b = tiny.model("llama"), tiny.model("llama")
    quantize_sequential(a, _Probe(scale=1.0), samples)
    quantize_sequential(b, _Probe(scale=0.5), samples)
    h0a, h0b = a.model.layers[0].self_attn.q_proj.hessian, b.model.layers[0].self_attn.q_proj.hessian
    assert torch.allclose(h0a, h0b)  # layer 0 sees the same embeddings
    h1a, h1b = a.model.layers[1].self_attn.q_proj.hessian, b.model.layers[1].self_attn.q_proj.hessian
    assert not torch.allclose(h1a, h1b)


def test_bf16_model_is_worked_in_fp32_and_stays_bf16(tiny):
    model = tiny.model("llama").to(torch.bfloat16)
    quantized, _ = quantize_sequential(model, _Probe(), _samples())
    rec = model.get_submodule(quantized[0])
    assert rec.hessian.dtype == torch.float64
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    args, kwargs = capture_block_inputs(model, _samples(1))[0]
    assert args[0].dtype == torch.float32


def test_decoder_layers_error():
    with pytest.raises(Exception, match="no decoder layer stack"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------ calibration data


def test_task_calibration_is_chat_formatted_train_items():
    from natix.quant.models import load_tokenizer

    pytest.importorskip("reasoning_gym")
    tok = load_tokenizer("smollm2-135m")
    ids = load_calibration("chain_sum", tok, samples=4, max_length=256)
    assert len(ids) == 4
    text = tok.decode(ids[0])
    assert "<|im_start|>assistant" in text and "The answer is" in text and text.endswith("<|im_end|>")


def test_pydoc_halves_are_disjoint(tiny):
    from natix.quant.calib import _pydoc_topics

    cal, held = set(_pydoc_topics(0)), set(_pydoc_topics(1))
    assert cal and held and not cal & held
    assert heldout_text().startswith(_pydoc_topics(1)[0])


def test_jsonl_and_txt_sources(tiny, tmp_path):
    tok = tiny.tokenizer()
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": "w4 w5 w6"}, {"prompt": "w7 w8", "completion": " w9"}])
                 + "\n\n")
    ids = load_calibration(str(f), tok, samples=10, max_length=8)
    assert sorted(ids) == sorted([[4, 5, 6], [7, 8, 9]])
    t = tmp_path / "c.txt"
    t.write_text(" ".join(f"w{4 + i % 100}" for i in range(50)))
    ids = load_calibration(str(t), tok, samples=100, max_length=16)
    assert [len(x) for x in ids] == [16, 16, 16] or sorted(len(x) for x in ids) == [2, 16, 16, 16]


@pytest.mark.parametrize("case", ["missing", "empty", "badjson", "nokeys", "suffix", "notobject"])
def test_bad_calibration_sources(tiny, tmp_path, case):
    tok = tiny.tokenizer()
    path = {
        "missing": tmp_path / "nope.jsonl",
        "empty": tmp_path / "empty.jsonl",
        "badjson": tmp_path / "bad.jsonl",
        "nokeys": tmp_path / "keys.jsonl",
        "suffix": tmp_path / "data.csv",
        "notobject": tmp_path / "list.jsonl",
    }[case]
    content = {"empty": "  \n", "badjson": '{"text": "a"}\n{oops\n', "nokeys": '{"foo": 1}\n',
               "suffix": "a,b\n", "notobject": "[1, 2]\n"}.get(case)
    if content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError) as e:
        check_source(str(path))
        load_calibration(str(path), tok)
    msg = str(e.value)
    assert str(path) in msg or path.name in msg
    if case == "badjson":
        assert ":2:" in msg


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_huge_row_is_never_tokenized_whole(tiny, tmp_path, suffix):
    """A 69 MB one-line calibration row ran for over 20 minutes to 10 GB RSS: the whole text was
    tokenized before it was cut. Only what max_length tokens can need is tokenized now."""
    tok = tiny.tokenizer()
    seen: list[int] = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tok(text, **kw)

    text = " ".join(f"w{4 + i % 120}" for i in range(1_500_000))  # ~6 MB on one line
    src = tmp_path / f"big{suffix}"
    src.write_text(json.dumps({"text": text}) + "\n" if suffix == ".jsonl" else text)
    ids = load_calibration(str(src), Spy(), samples=2, max_length=16)
    assert ids and all(len(x) == 16 for x in ids)
    from natix.quant.calib import max_token_chars

    assert max(seen) <= 4 * 2 * 16 * max_token_chars(tok) < len(text) // 1000
