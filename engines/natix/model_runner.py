"""Runs the model for the scheduler: builds each step's inputs, owns the KV cache, captures decode
in CUDA graphs, and samples.

KV cache size: ``num_kv_pages``, else ``kv_cache_memory_gb``, else (CUDA) ``gpu_memory_utilization``
of the card minus what the weights took and an activation reserve for the largest prefill; on CPU
0.5 GB. Decode graphs: one per batch bucket (1, 2, 4, 8, 16, then steps of 16 to 64, 32 to 256 and
64 beyond), sampling mode and context class (:func:`context_buckets`: the attention's split count
is fixed in a graph, and short contexts want fewer splits), captured the first time a step needs
one (or all at once by :meth:`warmup`), sharing one memory pool; a step of B sequences replays the smallest bucket >= B with the rows past
B padded (they write to the scratch page and their logits are dropped). Inputs go to the device in
one copy from a pinned host buffer; outputs come back in one copy (the step's only sync).

A decode step is launched (:meth:`ModelRunner.launch_decode`) and collected
(:meth:`ModelRunner.collect`) separately, so the engine can launch step N+1 before it reads step
N's tokens (async scheduling): the next step's input tokens are then gathered on the device from
step N's sampled tokens, and a sequence's positions count its ``inflight`` tokens. The host
staging and result buffers are double-buffered (pinned), so filling one never races the copy of
the step still in flight.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from natix.engines.natix.kv_cache import SCRATCH_PAGE, PagedKVCache, bytes_per_page
from natix.engines.natix.model import Batch, DecoderModel
from natix.engines.natix.sampler import SamplingBatch, sample
from natix.engines.natix.sequence import Sequence
from natix.engines.natix.spec import EngineLoadError, EngineOptions
from natix.engines.natix.weights import ModelWeights
from natix.kernels.kv4_cache import kv_groups


def context_buckets(max_model_len: int) -> list[int]:
    """Context-length classes of captured decode graphs (256, 1024, 4096, ... up to max_model_len):
    the attention's split count is baked into a graph, and a short context wants fewer splits."""
    out, c = [], 256
    while c < max_model_len:
        out.append(c)
        c *= 4
    return out + [max_model_len]


def graph_buckets(max_seqs: int) -> list[int]:
    out = [1, 2, 4, 8] + list(range(16, 65, 16)) + list(range(96, 257, 32)) + list(range(320, max_seqs + 64, 64))
    out = [b for b in out if b < max_seqs] + [max_seqs]
    return sorted(set(out))


@dataclass
class PendingDecode:
    """A launched decode step: its sequences (row order), the device tensor of its sampled tokens
    (what a following step's inputs are gathered from), and what :meth:`ModelRunner.collect` reads."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # device [>= len(seqs)], the sampled tokens (any numeric dtype)
    host: torch.Tensor  # [len(seqs), 2] float64 (token, logprob) rows: pinned on CUDA, filled by an async copy
    event: Any  # torch.cuda.Event recorded after that copy (None off CUDA)
    tops: Optional[tuple[torch.Tensor, torch.Tensor, list[Any], int]] = None  # top logprobs: vals, ids, specs, n


class ModelRunner:
    def __init__(self, weights: ModelWeights, options: EngineOptions, max_model_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.spec = s = weights.spec
        self.options, self.device, self.dtype = options, device, dtype
        self.max_model_len = max_model_len
        kind = weights.kv_cache if options.kv_cache == "auto" else options.kv_cache
        if kind == "int4" and (s.head_dim & (s.head_dim - 1) or s.head_dim < 32):
            raise EngineLoadError(f"the KV4 kernels need a power-of-two head_dim >= 32, this model has {s.head_dim}")
        # channel groups per head of the KV4 cache (the artifact's kv_group_size, resolved for this head_dim)
        self.kv_groups = kv_groups(s.head_dim, weights.kv_group_size) if kind == "int4" else 1
        self.kv_kind = kind
        self.page_size = options.page_size
        self.max_pages = -(-max_model_len // self.page_size)
        self.model = DecoderModel(weights, kind, options.prefill_attention, max_model_len, device, dtype)
        self.weight_bytes = weights.nbytes()
        self.kv = PagedKVCache(kind, self._num_pages(), s.layers, s.kv_heads, s.head_dim, self.page_size, dtype, device,
                               self.kv_groups)
        self.use_graphs = options.cuda_graphs and device.type == "cuda"
        self.max_graph_batch = options.max_num_seqs
        self.buckets = graph_buckets(self.max_graph_batch)
        self.graphs: dict[tuple[int, str, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self.ctx_buckets = context_buckets(max_model_len)
        self.graph_pool: Any = None
        self.capture_s = 0.0
        g = self.max_graph_batch if self.use_graphs else options.max_num_seqs
        # decode inputs, int32: ids, positions, slots, lengths, source rows (async steps), block tables
        self._in_len = 5 * g + g * self.max_pages
        pin = device.type == "cuda"
        self.dev_in = torch.zeros(self._in_len, dtype=torch.int32, device=device)
        self._g = g
        # sampling parameters of a captured step: int64 [top_k, seed, index, position], float32 [temperature, top_p]
        self.dev_si = torch.zeros((4, g), dtype=torch.int64, device=device)
        self.dev_sf = torch.zeros((2, g), dtype=torch.float32, device=device)
        # two sets of pinned host buffers (inputs, sampling parameters, results), used alternately
        self._host = [(torch.zeros(self._in_len, dtype=torch.int32, pin_memory=pin),
                       torch.zeros((4, g), dtype=torch.int64, pin_memory=pin),
                       torch.zeros((2, g), dtype=torch.float32, pin_memory=pin),
                       torch.zeros(2 * max(g, options.max_num_seqs), dtype=torch.float64, pin_memory=pin))
                      for _ in range(2)]
        self._turn = 0

    # ------------------------------------------------------------------------------ memory
    def _num_pages(self) -> int:
        o, s = self.options, self.spec
        per_page = bytes_per_page(self.kv_kind, s.layers, s.kv_heads, s.head_dim, self.page_size, self.dtype,
                                  self.kv_groups)
        self.bytes_per_page = per_page
        if o.num_kv_pages is not None:
            budget = o.num_kv_pages * per_page
        elif o.kv_cache_memory_gb is not None:
            budget = o.kv_cache_memory_gb * 2**30
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            reserve = (o.max_num_batched_tokens * (s.q_width + 2 * s.kv_width + 3 * s.intermediate + 4 * s.hidden) * 4
                       + o.max_num_seqs * s.vocab * 16 + 2**29)
            budget = total * o.gpu_memory_utilization - used - reserve
        else:
            budget = 0.5 * 2**30
        pages = int(budget // per_page)
        need = self.max_pages + 1
        if pages < 2 or (pages < need and o.num_kv_pages is None):
            raise EngineLoadError(f"the KV cache budget ({budget / 2**30:.3f} GiB) holds {pages} pages of "
                                  f"{self.page_size} tokens, fewer than one sequence of max_model_len="
                                  f"{self.max_model_len} needs ({need}); lower max_model_len or raise the budget")
        return pages

    # ------------------------------------------------------------------------------ steps
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Compute every uncached token of ``seqs``; returns the logits [len(seqs), V] of their last tokens."""
        ps = self.page_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        new_lens, ctx_lens, last = [], [], []
        for s in seqs:
            n = len(s.token_ids)
            c = s.num_cached_tokens
            ids.extend(s.token_ids[c:])
            pos.extend(range(c, n))
            bt = s.block_table
            slots.extend(bt[p // ps] * ps + p % ps for p in range(c, n))
            new_lens.append(n - c)
            ctx_lens.append(c)
            last.append(len(ids) - 1)
        dev = self.device
        cu = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(new_lens, out=cu[1:])
        host = torch.from_numpy(np.concatenate([np.asarray(ids, np.int32), np.asarray(pos, np.int32),
                                                np.asarray(slots, np.int32), cu, np.asarray(last, np.int32)]))
        buf = host.to(dev, non_blocking=False)
        t = len(ids)
        batch = Batch(input_ids=buf[:t], positions=buf[t:2 * t], slots=buf[2 * t:3 * t], is_prefill=True,
                      logits_rows=buf[3 * t + len(seqs) + 1:].long(), new_lens=new_lens, ctx_lens=ctx_lens,
                      pages=[s.block_table for s in seqs], cu_seqlens=buf[3 * t:3 * t + len(seqs) + 1])
        with torch.inference_mode():
            return self.model.forward(batch, self.kv)

    def _stage_decode(self, seqs: list[Sequence], rows: int, prev: Optional[PendingDecode] = None) -> None:
        """Write the decode inputs of ``seqs`` (padded to ``rows``) into this turn's pinned buffer and
        copy it. A sequence with a token in flight (``prev`` not collected yet) takes that token from
        ``prev``'s device result, gathered after the copy."""
        g, mp, ps = self._g, self.max_pages, self.page_size
        host_in = self._host[self._turn][0]
        a = host_in.numpy()
        b = len(seqs)
        ids, pos, slots, lens, src = a[0:g], a[g:2 * g], a[2 * g:3 * g], a[3 * g:4 * g], a[4 * g:5 * g]
        bt = a[5 * g:].reshape(g, mp)
        rows_of = {id(x): j for j, x in enumerate(prev.seqs)} if prev is not None else {}
        for i, s in enumerate(seqs):
            n = len(s.token_ids) + s.inflight
            if s.inflight:
                src[i] = rows_of[id(s)]
            else:
                ids[i] = s.token_ids[-1]
            pos[i] = n - 1
            table = s.block_table
            slots[i] = table[(n - 1) // ps] * ps + (n - 1) % ps
            lens[i] = n
            bt[i, :len(table)] = table
        if rows > b:
            ids[b:rows] = 0
            pos[b:rows] = 0
            slots[b:rows] = SCRATCH_PAGE * ps
            lens[b:rows] = 1
            bt[b:rows] = SCRATCH_PAGE
        d = self.dev_in
        d.copy_(host_in, non_blocking=True)
        if prev is not None and any(s.inflight for s in seqs):
            flying = [i for i, s in enumerate(seqs) if s.inflight]
            if len(flying) == b:  # the usual case: every row continues a sequence of prev
                d[0:b].copy_(prev.tokens.index_select(0, d[4 * g:4 * g + b].long()))
            else:
                at = torch.tensor(flying, device=d.device)
                d[at] = prev.tokens.index_select(0, d[4 * g + at].long()).to(d.dtype)

    def _decode_batch(self, rows: int, max_len: int) -> Batch:
        g, mp = self._g, self.max_pages
        d = self.dev_in
        return Batch(input_ids=d[0:rows], positions=d[g:g + rows], slots=d[2 * g:2 * g + rows], is_prefill=False,
                     block_tables=d[5 * g:].view(g, mp)[:rows], seq_lens=d[3 * g:3 * g + rows], max_len=max_len)

    def decode(self, seqs: list[Sequence]) -> tuple[list[int], list[float], Optional[list[dict[int, float]]]]:
        """One token for each of ``seqs``: forward and sampling (one graph replay where captured)."""
        return self.collect(self.launch_decode(seqs))

    def launch_decode(self, seqs: list[Sequence], prev: Optional[PendingDecode] = None) -> PendingDecode:
        """Launch one decode step of ``seqs`` without waiting for it. Sequences with ``inflight``
        tokens continue from ``prev`` (launched, not collected): their input is its sampled token, on
        the device. Each sequence's ``inflight`` grows by one; :meth:`collect` reads the result."""
        b = len(seqs)
        specs = [s.request.spec for s in seqs]
        mode = _mode(specs)
        ctx = max(len(s.token_ids) + s.inflight for s in seqs)
        cb = next(c for c in self.ctx_buckets if c >= ctx)
        top_n = max(sp.top_logprobs for sp in specs)
        if self.use_graphs and b <= self.max_graph_batch:
            bucket = next(x for x in self.buckets if x >= b)
            if (bucket, mode, cb) not in self.graphs:
                self.capture(bucket, mode, cb)
            self._stage_decode(seqs, bucket, prev)
            if mode != "greedy":
                self._stage_sampling(seqs, bucket)
            graph, logits, res = self.graphs[(bucket, mode, cb)]
            graph.replay()
            logits, tokens, packed = logits[:b], res[:, 0], res[:b]
        else:
            self._stage_decode(seqs, b, prev)
            with torch.inference_mode():
                logits = self.model.forward(self._decode_batch(b, cb), self.kv)
            tokens, lps = self._sample_on_device(logits, seqs, specs, mode)
            packed = torch.stack([tokens.double(), lps.double()], dim=1)
        for s in seqs:
            s.inflight += 1
        return self._pending(seqs, tokens, packed, logits, specs, top_n)

    def _pending(self, seqs: list[Sequence], tokens: torch.Tensor, packed: torch.Tensor, logits: torch.Tensor,
                 specs: list[Any], top_n: int) -> PendingDecode:
        """Start the copy of a step's results (``packed`` [B, 2], contiguous) to this turn's pinned
        buffer (a contiguous view: a strided pinned destination would make the copy synchronous); flip the turn."""
        host = self._host[self._turn][3][:packed.numel()].view(packed.shape)
        tops = None
        with torch.inference_mode():
            if top_n:
                vals, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), top_n, dim=-1)
                tops = (vals, ids, specs, top_n)
            host.copy_(packed, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._turn ^= 1
        return PendingDecode(seqs, tokens, host, event, tops)

    def collect(self, p: PendingDecode) -> tuple[list[int], list[float], Optional[list[dict[int, float]]]]:
        """Wait for a launched step; its tokens, logprobs and (if asked) top logprobs, in row order.
        Each sequence's ``inflight`` drops by one."""
        if p.event is not None:
            p.event.synchronize()
        for s in p.seqs:
            s.inflight -= 1
        toks = [int(t) for t in p.host[:, 0].tolist()]
        tops = None
        if p.tops is not None:
            vals, ids, specs, _ = p.tops
            ids_l, vals_l = ids.cpu().tolist(), vals.cpu().tolist()
            tops = [{int(i): float(v) for i, v in zip(ids_l[r][:sp.top_logprobs], vals_l[r][:sp.top_logprobs])}
                    for r, sp in enumerate(specs)]
        return toks, p.host[:, 1].tolist(), tops

    def decode_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        """The eager decode forward: logits [len(seqs), V] of each sequence's next token. The attention's
        split count follows the context class, as in a captured graph, so both paths compute the same."""
        self._stage_decode(seqs, len(seqs))
        self._turn ^= 1
        ctx = max(len(s.token_ids) for s in seqs)
        with torch.inference_mode():
            return self.model.forward(self._decode_batch(len(seqs), next(c for c in self.ctx_buckets if c >= ctx)),
                                      self.kv)

    def _stage_sampling(self, seqs: list[Sequence], rows: int) -> None:
        _, host_si, host_sf, _ = self._host[self._turn]
        si, sf = host_si.numpy(), host_sf.numpy()
        b = len(seqs)
        for i, s in enumerate(seqs):
            sp = s.request.spec
            si[0, i], si[1, i], si[2, i], si[3, i] = sp.top_k, s.request.seed, s.index, s.num_output_tokens + s.inflight
            sf[0, i], sf[1, i] = sp.temperature, sp.top_p
        si[:, b:rows] = 0
        sf[0, b:rows] = 0.0
        sf[1, b:rows] = 1.0
        self.dev_si.copy_(host_si, non_blocking=True)
        self.dev_sf.copy_(host_sf, non_blocking=True)

    def capture(self, bucket: int, mode: str = "greedy", ctx: Optional[int] = None) -> None:
        """Capture decode + sampling of ``bucket`` rows for contexts up to ``ctx`` tokens (inputs: the
        scratch page, harmless). ``mode``: greedy, sample (temperature) or filter (top-k / top-p)."""
        t0 = time.perf_counter()
        ctx = ctx or self.max_model_len
        self._stage_decode([], bucket)
        batch = self._decode_batch(bucket, ctx)
        g = self._g
        sb = SamplingBatch(self.dev_sf[0, :bucket], self.dev_si[0, :bucket], self.dev_sf[1, :bucket],
                           self.dev_si[1, :bucket], self.dev_si[2, :bucket], self.dev_si[3, :bucket],
                           mode != "greedy", mode == "filter")
        res = torch.zeros((g, 2), dtype=torch.float64, device=self.device)  # rows of (token, logprob)

        def step() -> torch.Tensor:
            logits = self.model.forward(batch, self.kv)
            tokens, lps = sample(logits, sb)
            res[:bucket, 0] = tokens.double()
            res[:bucket, 1] = lps.double()
            return logits

        with torch.inference_mode():
            step()  # warm-up: compiles kernels, allocates workspaces
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = step()
        torch.cuda.synchronize(self.device)
        self.graph_pool = graph.pool()
        self.graphs[(bucket, mode, ctx)] = (graph, logits, res)
        self.capture_s += time.perf_counter() - t0

    def warmup(self, buckets: Optional[list[int]] = None, modes: tuple[str, ...] = ("greedy",),
               contexts: Optional[list[int]] = None) -> None:
        """Capture the graphs of ``buckets`` (default all) x ``modes`` x ``contexts`` (default: every
        context class), largest first (they share one memory pool)."""
        if not self.use_graphs:
            return
        ctxs = sorted({next(c for c in self.ctx_buckets if c >= x) for x in (contexts or self.ctx_buckets)}, reverse=True)
        for b in sorted(buckets or self.buckets, reverse=True):
            bucket = next(x for x in self.buckets if x >= b)
            for mode in modes:
                for cb in ctxs:
                    if (bucket, mode, cb) not in self.graphs:
                        self.capture(bucket, mode, cb)

    def warmup_prefill(self, max_tokens: Optional[int] = None) -> list[int]:
        """Run prefills of lengths that reach every kernel specialization a real prefill can need
        (each GEMM M bucket, and token counts that are and are not multiples of 16, and one after a cached
        page), writing only to the scratch page, so the first requests do not pay Triton's compilation.
        Returns the lengths (of the prefills without context)."""
        from types import SimpleNamespace

        from natix.kernels.w4a8_gemm import M_BUCKETS

        top = min(max_tokens or self.options.max_num_batched_tokens, self.max_model_len)
        lengths = sorted({n for b in M_BUCKETS for n in (b, b - 1, b + 1) if 1 <= n <= top} | {top})
        ps = self.page_size
        # and one prefill after a cached page (a prefix-cache hit's path: the context gather kernel)
        fakes = [SimpleNamespace(token_ids=[0] * n, num_cached_tokens=0, block_table=[SCRATCH_PAGE] * -(-n // ps))
                 for n in lengths]
        if top > ps:
            fakes.append(SimpleNamespace(token_ids=[0] * (ps + 1), num_cached_tokens=ps, block_table=[SCRATCH_PAGE] * 2))
        for fake in fakes:
            logits = self.prefill([fake])  # type: ignore[list-item]
            z = logits.new_zeros(0)
            with torch.inference_mode():
                sample(logits, SamplingBatch(z, z, z, z, z, z, False, False))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return lengths

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            self.kv.copy_pages([c[0] for c in copies], [c[1] for c in copies])

    # ------------------------------------------------------------------------------ sampling
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float], Optional[list[dict[int, float]]]]:
        """One token per sequence from its logits row (eager: the prefill's logits); one device->host copy."""
        specs = [s.request.spec for s in seqs]
        top_n = max(sp.top_logprobs for sp in specs)
        with torch.inference_mode():
            tokens, lps = self._sample_on_device(logits, seqs, specs, _mode(specs))
            packed = torch.stack([tokens.double(), lps.double()]).cpu()
        toks = [int(t) for t in packed[0].tolist()]
        return toks, packed[1].tolist(), self._tops(logits, specs, top_n) if top_n else None

    @staticmethod
    def _sample_on_device(logits: torch.Tensor, seqs: list[Sequence], specs: list[Any], mode: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        if mode != "greedy":
            dev = logits.device
            ints = torch.tensor([[sp.top_k for sp in specs], [s.request.seed for s in seqs], [s.index for s in seqs],
                                 [s.num_output_tokens + s.inflight for s in seqs]], dtype=torch.int64)
            flts = torch.tensor([[sp.temperature for sp in specs], [sp.top_p for sp in specs]], dtype=torch.float32)
            ints, flts = ints.to(dev, non_blocking=True), flts.to(dev, non_blocking=True)
            sb = SamplingBatch(flts[0], ints[0], flts[1], ints[1], ints[2], ints[3], True, mode == "filter")
        else:
            z = logits.new_zeros(0)
            sb = SamplingBatch(z, z, z, z, z, z, False, False)
        with torch.inference_mode():
            return sample(logits, sb)

    @staticmethod
    def _tops(logits: torch.Tensor, specs: list[Any], top_n: int) -> list[dict[int, float]]:
        """The ``top_logprobs`` most likely tokens of each row, under the raw distribution."""
        with torch.inference_mode():
            lp = torch.log_softmax(logits.float(), dim=-1)
            vals, ids = torch.topk(lp, top_n, dim=-1)
            ids, vals = ids.cpu().tolist(), vals.cpu().tolist()
        return [{int(i): float(v) for i, v in zip(ids[r][:sp.top_logprobs], vals[r][:sp.top_logprobs])}
                for r, sp in enumerate(specs)]


def _mode(specs: list[Any]) -> str:
    """Which sampling path a batch needs: greedy, sample (temperature only) or filter (top-k / top-p)."""
    if not any(sp.temperature > 0 for sp in specs):
        return "greedy"
    if any(sp.temperature > 0 and (sp.top_k or sp.top_p < 1) for sp in specs):
        return "filter"
    return "sample"
