"""The server's side of the tokenizer: chat formatting, prompt counting and limits, token text.

The engine tokenizes prompts itself; the server tokenizes too, to enforce the context limit
before a request is queued, to report usage, and to render logprob tokens. Both use the model's
own tokenizer with ``add_special_tokens=False`` (prompts are already formatted: the engines'
convention), so the counts agree.
"""

from __future__ import annotations

from typing import Any, Sequence

from natix.engines.chat import apply_chat
from natix.engines.serve.protocol import APIError, ChatMessage

__all__ = ["Tokens"]


class Tokens:
    """``tokenizer`` plus the context length ``max_model_len`` it serves."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        # No token is longer than this many characters, so a text longer than
        # max_model_len * this is over the limit without tokenizing it (a 1 MB prompt).
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._max_token_chars = max(1, max(len(t) for t in vocab if t))

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The model's chat template over ``messages``, ending with the assistant's turn. A
        tokenizer without a template takes one user turn (plus an optional system message),
        formatted as :func:`natix.engines.chat.apply_chat` does."""
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        roles = [t["role"] for t in turns]
        if roles == ["user"] or roles == ["system", "user"]:
            system = turns[0]["content"] if len(turns) == 2 else None
            return apply_chat(self.tokenizer, turns[-1]["content"], system=system)
        raise APIError(400, "this model has no chat template: send one user message (and optionally a "
                       "system message before it), or use /v1/completions", param="messages")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def checked_prompt(self, prompt: str | Sequence[int], param: str) -> list[int]:
        """Token ids of ``prompt``, refused (400 naming ``param``) if empty, out of vocabulary
        or longer than the context."""
        if isinstance(prompt, str):
            if len(prompt) > self.max_model_len * self._max_token_chars:
                raise APIError(400, f"the {param} ({len(prompt)} characters) is longer than this model's "
                               f"context of {self.max_model_len} tokens", param=param, code="context_length_exceeded")
            ids = self.encode(prompt)
        else:
            ids = list(prompt)
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"{param} has token ids outside the vocabulary [0, {vocab})", param=param)
        if not ids:
            raise APIError(400, f"the {param} is empty", param=param)
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"the {param} has {len(ids)} tokens; this model's context is "
                           f"{self.max_model_len} tokens", param=param, code="context_length_exceeded")
        return ids

    def token_texts(self, ids: Sequence[int], as_ids: bool, special: bool = False) -> list[str]:
        """One string per token: its decoded text, or ``token_id:<id>``. Special tokens (the EOS
        that ended a sample) decode to "" unless ``special`` (the alternatives in
        ``top_logprobs``), so a sample's tokens join to its text as OpenAI's do."""
        if as_ids:
            return [f"token_id:{i}" for i in ids]
        return [self.tokenizer.decode([i], skip_special_tokens=not special) for i in ids]
