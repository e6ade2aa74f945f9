"""Train the demo LoRA adapter for SmolLM2-135M on reasoning-gym ``chain_sum``.

The adapter learns to answer multi-step +/- problems with worked steps
("4 - 1 = 3. 3 + 7 = 10. The answer is 10."), which the task's verifier can check step by
step. Training items come from the task's ``train`` split, which is disjoint from ``eval`` by
construction (see natix.bench.tasks.split_of).

Reproduce (the committed fixture was made this way; the command and environment are also in
the adapter folder's natix_training.json):

    python scripts/train_demo_adapter.py --out bench/data/adapters/smollm2-chain-sum-lora

Runs on CUDA if present (about a minute on an H100), else CPU (2 cores: ~15-25 min).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path


def make_examples(tok, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) pairs from the chain_sum train split."""
    from natix.bench.tasks import get_task, worked_solution
    from natix.engines.chat import apply_chat

    task = get_task("chain_sum")
    out = []
    for it in task.items("train", n, seed=seed):
        prompt = apply_chat(tok, task.user_text(it), system=task.system)
        target = worked_solution(it.meta["expression"]) + tok.eos_token
        out.append((tok(prompt, add_special_tokens=False).input_ids,
                    tok(target, add_special_tokens=False).input_ids))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--examples", help="token ids from --dump-examples (lets a machine without "
                    "reasoning-gym train on exactly the same data)")
    ap.add_argument("--dump-examples", help="write the tokenized training examples here and exit")
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from natix.quant.models import load_base

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, tok = load_base(args.base, dtype="fp32", device=device)
    tok.padding_side = "right"

    if args.examples:
        examples = [tuple(json.loads(line)) for line in open(args.examples)]
    else:
        examples = make_examples(tok, args.steps * args.batch, args.seed)
    if args.dump_examples:
        with open(args.dump_examples, "w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in examples)
        return 0

    cfg = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )

    t0 = time.time()
    log = []
    for step in range(args.steps):
        batch = examples[step * args.batch:(step + 1) * args.batch]
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)  # loss on the answer tokens only
        attn = torch.zeros_like(ids)
        for i, (p, t) in enumerate(batch):
            seq = p + t
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p): len(seq)] = torch.tensor(t)
            attn[i, : len(seq)] = 1
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.append(round(out.loss.item(), 4))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {out.loss.item():.4f} {time.time() - t0:.0f}s", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.save_dtype]
    model.to(save_dtype)
    model.save_pretrained(out_dir)
    import peft
    import transformers

    (out_dir / "natix_training.json").write_text(json.dumps({
        "command": "python scripts/train_demo_adapter.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "base": args.base, "task": "chain_sum", "split": "train", "examples": len(examples),
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "rank": args.rank,
        "seed": args.seed, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "seconds": round(time.time() - t0, 1), "loss_first": log[:5], "loss_last": log[-5:],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
    }, indent=2))
    print(f"saved to {out_dir} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
