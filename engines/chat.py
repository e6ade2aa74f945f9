"""Chat formatting for callers: engines take plain prompt strings, already formatted.

Keeping the template out of ``Engine.generate`` means every engine (hf, vLLM, an HTTP server)
sees the same text, so a benchmark cell compares engines, not templates.
"""

from __future__ import annotations

from typing import Any


def apply_chat(tokenizer: Any, user_text: str, system: str | None = None) -> str:
    """Format one user turn (plus an optional system message) as the prompt string the model
    expects, ending with the assistant generation prompt.

    Uses the tokenizer's chat template; a tokenizer without one (a raw base model, a test
    tokenizer) gets the plain text, with the system message as a first paragraph.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": user_text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{user_text}" if system else user_text
