"""natix.kernels: Triton kernels for W4A8KV4 (+ FP8 through torch._scaled_mm), each with a pure-torch reference.

Modules (import them directly; this package imports nothing heavy):
packing (the W4A8 weight format), w4a8_gemm, rmsnorm_quant, kv4_cache, kv4_decode_attention, fp8_linear,
select (can_implement / make_linear).
"""
