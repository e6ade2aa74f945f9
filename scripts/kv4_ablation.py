"""Experiment (not product code): where KV4's perplexity cost sits, on the reference path.

    python scripts/kv4_ablation.py ARTIFACT --split 32:0,0:32,64:0,0:64 [--key-smooth 0.5:64:64,1.0:32:64]

Perplexity as ``natix-quant eval`` measures it (held-out pydoc, the first ``--windows`` windows of 512
tokens, every window read through the reference KV cache with quantized prefill), with the artifact's
KV4 quantization replaced by:

- ``--split K:V``: keys quantized in groups of K channels and values in groups of V (``quantize_rows_reference``,
  the one KV4 definition; 0 = left 16-bit; the head dim = one scale per head);
- ``--key-chan P:V``: keys quantized per channel over blocks of P consecutive tokens (KIVI's key layout,
  w4a8kv4's ``kv_key_block`` through the product's own cache: one scale and zero per complete block, head
  and channel; the incomplete block 16-bit), values in groups of V channels per token;
- ``--key-chan-greedy P:V``: the same cache during decoding, then greedy accuracy on ``--task`` (``--items``) next to the artifact's own KV4 and a 16-bit
  cache, on the same items. Batched prompts are left-padded, so a prompt's first block can include pad
  tokens' keys in its ranges (pessimistic); ``--key-static-greedy Q:V`` adds ``--key-static``'s keys to
  that comparison;
- ``--key-static Q:V``: keys quantized per channel with static ranges (per layer, head and channel: the
  Q-quantile of the calibration windows' low and high values, 1.0 = their min and max; no scale per token),
  values in groups of V per token;
- ``--key-smooth ALPHA:K:V``: as ``--split K:V``, with the keys divided before quantization and multiplied
  back after by a static per-channel ``λ = max|k|^ALPHA`` (post-RoPE absolute maxima per layer, head and
  channel, shared by each RoPE pair so that it could be folded into q_proj / k_proj before RoPE), calibrated
  on the windows after the evaluated ones.

One JSON line per configuration on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--split", default="")
    ap.add_argument("--key-smooth", default="")
    ap.add_argument("--key-chan", default="")
    ap.add_argument("--key-static", default="")
    ap.add_argument("--key-chan-greedy", default="")
    ap.add_argument("--key-static-greedy", default="", help="Q:V,...: greedy accuracy with --key-static's keys")
    ap.add_argument("--task", default="chain_sum")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-windows", type=int, default=8)
    a = ap.parse_args()

    import torch

    import natix.quant.kv_quant as kq
    from natix.engines.kv_cache import cache_argument
    from natix.quant.evaluate import read_text
    from natix.quant.kv_quant import fake_quant_int4
    from natix.quant.loader import load_artifact

    model, tok = load_artifact(a.artifact)
    ids = tok(read_text("pydoc"), add_special_tokens=False)["input_ids"]
    wins = [w for w in (ids[i:i + 512] for i in range(0, len(ids), 512)) if len(w) > 1]
    evals, calib = wins[:a.windows], wins[a.windows:a.windows + a.calib_windows]
    cls = kq.quantized_cache_class()
    plain_update = cls.__mro__[1].update  # DynamicCache.update: store as given
    own = cls.update  # the artifact's own KV quantization
    kw = cache_argument(model)

    def fq(x: torch.Tensor, g: int) -> torch.Tensor:  # g channels a group; 0: left 16-bit
        return x if g == 0 else fake_quant_int4(x, x.shape[-1] // g)

    def key_blocks(pb: int, vg: int):
        """the product's own kv_key_block cache (natix.quant.kv_quant.quantize_key_blocks) with keys per
        channel over blocks of pb tokens and values in groups of vg"""
        def update(self, k, v, li, *x, **y):
            self.natix_key_block, self.natix_kv_groups = pb, v.shape[-1] // vg
            return own(self, k, v, li, *x, **y)
        return update

    def ppl(windows, update) -> float:
        cls.update = update
        nll, n = 0.0, 0
        with torch.no_grad():
            for w in windows:
                t = torch.tensor([w])
                cache = kq.new_cache(model, prefill="quantized")
                logits = model(input_ids=t, **{kw: cache, "use_cache": True}).logits[0, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum"))
                n += len(w) - 1
        return math.exp(nll / n)

    def emit(**rec) -> None:
        print(json.dumps({"artifact": a.artifact, "windows": len(evals), **rec}), flush=True)

    for spec in filter(None, a.split.split(",")):
        kg, vg = map(int, spec.split(":"))
        t0 = time.time()
        p = ppl(evals, lambda self, k, v, li, *x, **y: plain_update(self, fq(k, kg), fq(v, vg), li, *x, **y))
        emit(mode="split", k_group=kg, v_group=vg, ppl=p, s=round(time.time() - t0))

    for spec in filter(None, a.key_chan.split(",")):
        pb, vg = map(int, spec.split(":"))
        t0 = time.time()
        p = ppl(evals, key_blocks(pb, vg))
        emit(mode="key-chan", k_block_tokens=pb, v_group=vg, ppl=p, s=round(time.time() - t0))

    def static_update(qt: float, vg: int):
        """keys by static per-channel ranges (the calibration windows' qt-quantiles), values in groups of vg"""
        seen: dict[int, list] = {}

        def collect_k(self, k, v, li, *x, **y):
            seen.setdefault(li, []).append(k.float().transpose(1, 2).reshape(-1, k.shape[1], k.shape[3]))  # [T, H, D]
            return plain_update(self, k, v, li, *x, **y)

        ppl(calib, collect_k)
        gen = torch.Generator().manual_seed(0)
        rng = {}
        for li, parts in seen.items():
            t = torch.cat(parts)
            if qt < 1:
                t = t[torch.randperm(t.shape[0], generator=gen)[:8192]]
                rng[li] = (torch.quantile(t, 1 - qt, dim=0), torch.quantile(t, qt, dim=0))
            else:
                rng[li] = (t.amin(0), t.amax(0))

        def update(self, k, v, li, *x, **y):
            lo, hi = (r[None, :, None, :] for r in rng[li])  # [1, H, 1, D]
            sc = ((hi - lo) / 15).clamp_min(1e-8)
            kq = (torch.clamp(torch.round((k.float() - lo) / sc), 0, 15) * sc + lo).to(k.dtype)
            return plain_update(self, kq, fq(v, vg), li, *x, **y)
        return update

    for spec in filter(None, a.key_static.split(",")):
        qt, vg = float(spec.split(":")[0]), int(spec.split(":")[1])
        update = static_update(qt, vg)
        t0 = time.time()
        emit(mode="key-static", quantile=qt, v_group=vg, ppl=ppl(evals, update), calib_windows=len(calib),
             s=round(time.time() - t0))

    if a.key_chan_greedy or a.key_static_greedy:
        from natix.quant.evaluate import check_eval, task_accuracy

        def greedy(update) -> tuple[float, list]:
            cls.update = update
            _, _, matrix = check_eval(a.artifact, adapter=None, ppl="none", task=a.task, strategies=["greedy"],
                                      items=a.items, temperature=0.7, device="cpu", dtype="auto", jsonl=None)
            cell = task_accuracy(matrix)[0]
            return cell["accuracy"], cell["per_item"]["correct"]

        for label, upd in [("artifact KV4", own), ("16-bit", plain_update)] + [
                (f"key-chan {s}", key_blocks(*map(int, s.split(":")))) for s in filter(None, a.key_chan_greedy.split(","))] + [
                (f"key-static {s}", static_update(float(s.split(":")[0]), int(s.split(":")[1])))
                for s in filter(None, a.key_static_greedy.split(","))]:
            t0 = time.time()
            acc, correct = greedy(upd)
            emit(mode="greedy", config=label, task=a.task, items=a.items, accuracy=acc, correct=correct,
                 s=round(time.time() - t0))
        cls.update = own

    if a.key_smooth:
        amax: dict[int, torch.Tensor] = {}

        def collect(self, k, v, li, *x, **y):
            m = k.float().abs().amax(dim=(0, 2))  # [H, D]
            amax[li] = torch.maximum(amax[li], m) if li in amax else m
            return plain_update(self, k, v, li, *x, **y)

        ppl(calib, collect)
        for spec in a.key_smooth.split(","):
            alpha, kg, vg = float(spec.split(":")[0]), *map(int, spec.split(":")[1:])
            lam = {}
            for li, m in amax.items():
                half = m.shape[-1] // 2
                pm = torch.maximum(m[:, :half], m[:, half:]).clamp_min(1e-5) ** alpha
                pm = torch.cat([pm, pm], -1)
                lam[li] = (pm / pm.mean(-1, keepdim=True))[None, :, None, :]

            def update(self, k, v, li, *x, **y):
                s = lam[li].to(k.dtype)
                return plain_update(self, fq(k / s, kg) * s, fq(v, vg), li, *x, **y)

            t0 = time.time()
            emit(mode="key-smooth", alpha=alpha, k_group=kg, v_group=vg, ppl=ppl(evals, update),
                 calib_windows=len(calib), s=round(time.time() - t0))


if __name__ == "__main__":
    main()
