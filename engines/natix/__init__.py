"""natix.engines.natix: natix's own serving engine (engine name ``natix``).

One concept per module, in nano-vllm's split: ``spec`` (what runs, options), ``weights`` (tensors
from a loaded model or drawn at random), ``layers`` (linears and fused ops bound to a device path),
``model`` (the Llama-family decoder), ``kv_cache`` (paged UINT4 / 16-bit cache), ``block_manager``
(reference-counted pages, forks, prefix caching), ``sequence``, ``scheduler`` (continuous batching,
preemption), ``sampler`` (batched, counter-based sampling), ``model_runner`` (inputs, CUDA graphs),
``engine`` (the Engine protocol and the streaming interface). Importing this package is cheap.
"""
