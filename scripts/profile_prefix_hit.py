"""Experiment: TTFT of a prefix-cache hit in the natix engine (Llama-3-8B shape, random weights).

    bash scripts/gpu_run.sh python3 scripts/profile_prefix_hit.py [SCHEME]

The same 1024-token prompt is sent four times, two new tokens each (after the first, 960 tokens hit
the cache and prefill computes the last page only); prints the TTFTs as JSON (cold, the first hit, a second hit, a profiled hit) and the
profiled hit's torch.profiler tables by CUDA and by CPU time."""
import json
import sys

sys.path.insert(0, "scripts")
import torch
import bench_engine as be
from natix.engines.natix.weights import LLAMA3_8B
be.SPEC = LLAMA3_8B
from natix.engines.base import SamplingSpec

scheme = sys.argv[1] if len(sys.argv) > 1 else "w4a8kv4"
e = be.make_engine(scheme, -1, max_num_seqs=8, max_model_len=2048, max_num_batched_tokens=8192, kv_cache_memory_gb=8)
e.runner.warmup([1], contexts=[1100])
vocab = e.runner.spec.vocab
for seed in (1, 2):  # warm the 1024-token prefill shape
    be.run_requests(e, be.prompts_of(1, 1024, vocab, seed=seed), SamplingSpec(max_tokens=2))
p = be.prompts_of(1, 1024, vocab, seed=5)
res = {}
res["cold"] = be.run_requests(e, p, SamplingSpec(max_tokens=2))["ttft_ms_p50"]
res["warm1"] = be.run_requests(e, p, SamplingSpec(max_tokens=2))["ttft_ms_p50"]
res["warm2"] = be.run_requests(e, p, SamplingSpec(max_tokens=2))["ttft_ms_p50"]
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    res["warm_profiled"] = be.run_requests(e, p, SamplingSpec(max_tokens=2))["ttft_ms_p50"]
print(json.dumps(res))
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
