"""Decode-time KV cache that writes in place instead of concatenating.

transformers' ``DynamicLayer.update`` appends with ``torch.cat``, which copies the whole cache
of every layer at every decode step: O(T^2) bytes over a generation. At batch 128 on CPU that
was 25% of decode time for SmolLM2. After prefill (and after any kv press has pruned the
cache) we move each layer into a buffer with room for the tokens still to come; decode then
writes one slot per step and attention reads a view.
"""

from __future__ import annotations

from typing import Any


def _slab_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views into a preallocated buffer
        (B, H, capacity, D); ``update`` writes in place and doubles the buffer when full."""

        def __init__(self, layer: Any, extra: int) -> None:  # noqa: D107 - adopts ``layer``
            self.__dict__.update(layer.__dict__)
            self._len = layer.keys.shape[-2]
            self._kbuf = self._alloc(layer.keys, self._len + extra)
            self._vbuf = self._alloc(layer.values, self._len + extra)
            self._views()

        @staticmethod
        def _alloc(t: Any, capacity: int) -> Any:
            b, h, n, d = t.shape
            buf = t.new_empty((b, h, capacity, d))
            buf[:, :, :n] = t
            return buf

        def _views(self) -> None:
            self.keys = self._kbuf[:, :, : self._len]
            self.values = self._vbuf[:, :, : self._len]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            n = key_states.shape[-2]
            if self._len + n > self._kbuf.shape[-2]:
                cap = 2 * (self._len + n)
                self._kbuf = self._alloc(self.keys, cap)
                self._vbuf = self._alloc(self.values, cap)
            self._kbuf[:, :, self._len : self._len + n] = key_states
            self._vbuf[:, :, self._len : self._len + n] = value_states
            self._len += n
            self._views()
            return self.keys, self.values

        def reorder_cache(self, beam_idx: Any) -> None:
            self._kbuf = self._kbuf.index_select(0, beam_idx.to(self._kbuf.device))
            self._vbuf = self._vbuf.index_select(0, beam_idx.to(self._vbuf.device))
            self._views()

        def batch_select_indices(self, indices: Any) -> None:
            self.reorder_cache(indices)

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            self._len = max(0, self._len + tokens_to_remove)
            self._views()

    return SlabLayer


_SLAB: type | None = None


def cache_argument(model: Any) -> str:
    """The keyword ``model.forward`` takes the KV cache under: transformers 5.2 (the kvpress
    env) says ``past_key_values``; 5.2x renamed it to ``cache`` (the old name is deprecated)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def preallocate(cache: Any, extra_tokens: int) -> bool:
    """Switch every plain ``DynamicLayer`` of ``cache`` to in-place writes with room for
    ``extra_tokens`` more positions. Leaves caches of other kinds (sliding, quantized, a
    version of transformers without ``cache.layers``) untouched. Returns whether it switched."""
    global _SLAB
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - very old transformers
        return False
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return False
    if _SLAB is None:
        _SLAB = _slab_class()
    for i, layer in enumerate(layers):
        layers[i] = _SLAB(layer, extra_tokens)
    return True
