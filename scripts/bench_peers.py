"""The baselines of reports/engine.md, measured on the same card in the same run as the natix engine:

- gpt-fast (pytorch-labs/gpt-fast, its own ``model.py``; a peer whose code we run, never copy): Llama-3-8B
  shape, random weights, static KV cache, greedy decode compiled with ``mode="reduce-overhead"``
  (CUDA graphs), bf16 and its tinygemm int4 g128 linears (``torch.ops.aten._weight_int4pack_mm``);
- transformers ``generate`` with a static cache and ``torch.compile`` (bf16).

    python scripts/bench_peers.py --gpt-fast .peers/gpt-fast --out out.jsonl [--batches 1,64] [--peers gptfast,hf]

``--gpt-fast`` is a folder holding gpt-fast's ``model.py``, ``quantize.py`` and the ``tokenizer.py`` and
``GPTQ.py`` that quantize.py imports (fetch the repository; it is not vendored). Decode tok/s counts the tokens of the timed decode steps over their time; prefill is
timed apart. inductor's coordinate-descent tuning (gpt-fast's default) is off: its autotuning cost
minutes of device time per shape; say so next to the numbers.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from bench_engine import Out, environment  # noqa: E402

DEV = torch.device("cuda")


def _int4_pack(weight: torch.Tensor, groupsize: int = 128, inner_k_tiles: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-fast's group quantization, with the uint8 [N, K/2] input that torch >= 2.5's
    ``_convert_weight_to_int4pack`` takes (gpt-fast's last release still passes int32 codes)."""
    from quantize import group_quantize_tensor  # gpt-fast

    w_int32, scales_and_zeros = group_quantize_tensor(weight.to(torch.bfloat16), n_bit=4, groupsize=groupsize)
    packed = (w_int32[:, ::2] << 4 | w_int32[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles), scales_and_zeros


def gptfast_model(batch: int, max_len: int, int4: bool):
    from model import Transformer  # gpt-fast
    from quantize import WeightOnlyInt4Linear  # gpt-fast

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = Transformer.from_name("Llama-3-8B")
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    if int4:
        def swap(mod):
            for name, child in mod.named_children():
                if isinstance(child, torch.nn.Linear):
                    q = WeightOnlyInt4Linear(child.in_features, child.out_features, bias=False, groupsize=128,
                                             inner_k_tiles=8, padding=False)
                    w, sz = _int4_pack(child.weight.data)
                    q.weight, q.scales_and_zeros = w, sz.to(DEV)
                    setattr(mod, name, q)
                else:
                    swap(child)
        swap(model)
    model = model.to(DEV).eval()
    with torch.device(DEV):
        model.setup_caches(max_batch_size=batch, max_seq_length=max_len)
    return model


def run_gptfast(out: Out, batch: int, prompt_len: int, gen: int, int4: bool) -> None:
    import torch._inductor.config as ic

    ic.coordinate_descent_tuning = False
    ic.triton.unique_kernel_names = True
    model = gptfast_model(batch, prompt_len + gen, int4)

    def step(x, pos):
        return model(x, pos)[:, -1].argmax(-1, keepdim=True)

    decode = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    x = torch.randint(0, 128256, (batch, prompt_len), device=DEV)

    def once() -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            tok = step(x, torch.arange(prompt_len, device=DEV))
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            pos = torch.tensor([prompt_len], device=DEV)
            for i in range(gen - 1):
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    tok = decode(tok.clone(), pos)
                pos += 1
            torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1

    t = time.perf_counter()
    once()  # compile + capture
    compile_s = time.perf_counter() - t
    pre, dec = once()
    out(kind="peer", peer="gpt-fast", scheme="int4-g128 (tinygemm)" if int4 else "bf16", batch=batch,
        prompt_len=prompt_len, gen=gen, decode_tok_per_s=round(batch * (gen - 1) / dec, 1),
        decode_step_ms=round(dec / (gen - 1) * 1e3, 3), prefill_s=round(pre, 4), compile_s=round(compile_s, 1),
        output_tok_per_s=round(batch * gen / (pre + dec), 1), note="inductor coordinate_descent_tuning off")
    del model, decode
    gc.collect()
    torch.cuda.empty_cache()


def run_hf(out: Out, batch: int, prompt_len: int, gen: int) -> None:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    # generate compiles the forward itself (its compile_config: CUDA graphs) once the cache is static, and
    # marks each step for CUDA graphs; wrapping model.forward in torch.compile by hand made transformers
    # 5.17 read a graph output that the next replay had overwritten (h200-peers run)
    model.generation_config.cache_implementation = "static"
    x = torch.randint(0, 128256, (batch, prompt_len), device=DEV)
    kw = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, pad_token_id=0)

    def once() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    t = time.perf_counter()
    once()
    once()  # generate recompiles once for the decode shape
    compile_s = time.perf_counter() - t
    total = once()
    out(kind="peer", peer="transformers generate (static cache + compile)", scheme="bf16", batch=batch,
        prompt_len=prompt_len, gen=gen, output_tok_per_s=round(batch * gen / total, 1),
        step_ms_incl_prefill=round(total / gen * 1e3, 3), wall_s=round(total, 3), compile_s=round(compile_s, 1),
        transformers=transformers.__version__)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--gpt-fast", default=".peers/gpt-fast")
    p.add_argument("--peers", default="gptfast,gptfast-int4,hf")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; later cells are skipped, and say so")
    a = p.parse_args()
    sys.path.insert(0, a.gpt_fast)
    out = Out(a.out, environment())
    t_end = time.perf_counter() + a.deadline
    for b in (int(x) for x in a.batches.split(",")):
        for peer in a.peers.split(","):
            t = time.perf_counter()
            if t > t_end:
                out(kind="peer", peer=peer, batch=b, error="skipped: the run's deadline passed")
                continue
            try:
                if peer == "hf":
                    run_hf(out, b, a.prompt_len, a.gen)
                else:
                    run_gptfast(out, b, a.prompt_len, a.gen, int4=peer == "gptfast-int4")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                out(kind="peer", peer=peer, batch=b, error=f"{type(e).__name__}: {e}")
            print(f"== {peer} B={b}: {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
