"""Checkpoint verification against the manifest (inspect and the loader), and the torch-free
per-scheme tensor layouts it uses, which must be exactly what each scheme's modules store."""

from __future__ import annotations

import json
import shutil

import pytest

from natix.quant.errors import ArtifactError
from natix.quant.fp8_config import Fp8Config
from natix.quant.gptq_config import GptqConfig
from natix.quant.w4a8kv4_config import W4A8KV4Config

ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float8_e4m3fn": "F8_E4M3", "int32": "I32",
      "int64": "I64", "uint8": "U8"}


@pytest.mark.parametrize(("cfg", "meta"), [
    (Fp8Config(), {}),
    (GptqConfig(), {"group_size": 64, "actorder": None, "symmetric": True}),
    (GptqConfig(scale_dtype="float16"), {"group_size": -1, "actorder": "weight", "symmetric": False}),
    (GptqConfig(), {"group_size": 32, "actorder": "group", "symmetric": False}),
    (W4A8KV4Config(), {"group_size": 128}),
    (W4A8KV4Config(), {"group_size": -1}),
])
def test_tensor_layout_is_the_modules_state_dict(cfg, meta):
    import torch

    out_f, in_f = 136, 256
    mod = cfg.empty_linear(in_f, out_f, False, torch.float32, meta)
    actual = {k: (ST[str(v.dtype).removeprefix("torch.")], tuple(v.shape)) for k, v in mod.state_dict().items()}
    assert cfg.tensor_layout(out_f, in_f, meta) == actual


@pytest.fixture(scope="module")
def fp8(base_dirs, tmp_path_factory):
    from natix.quant.export import export

    return export(str(base_dirs["llama"]), Fp8Config(), tmp_path_factory.mktemp("ck") / "fp8", dtype="fp32").out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loader_refuses_what_the_manifest_does_not_describe(fp8, base_dirs, tmp_path):
    from natix.quant.loader import load_artifact

    liar = _copy(base_dirs["llama"], tmp_path / "liar")  # fp32 tensors under an fp8 manifest
    shutil.copy(fp8 / "natix_manifest.json", liar)
    with pytest.raises(ArtifactError, match="is not a fp8 checkpoint as its manifest says: layer .*weight is F32"):
        load_artifact(liar)
    wrong_dtype = _copy(fp8, tmp_path / "dtype")
    m = json.loads((wrong_dtype / "natix_manifest.json").read_text())
    (wrong_dtype / "natix_manifest.json").write_text(json.dumps({**m, "dtype": "bf16"}))
    with pytest.raises(ArtifactError, match="is F32 but the manifest says unquantized tensors are bf16"):
        load_artifact(wrong_dtype)
    trunc = _copy(fp8, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:-1])
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_artifact(trunc)
    index = _copy(fp8, tmp_path / "index")
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    with pytest.raises(ArtifactError, match="disagrees with the safetensors files"):
        load_artifact(index)


def test_every_scheme_verifies(wide_base, calib_file, tmp_path):
    from natix.quant.export import export
    from natix.quant.loader import describe_artifact

    for cfg in (GptqConfig(actorder="group", symmetric=False), W4A8KV4Config(gptq=False)):
        out = export(str(wide_base), cfg, tmp_path / cfg.scheme, dtype="bf16", calib=str(calib_file),
                     calib_samples=4).out
        # w4a8kv4: the 14 linears, and the embedding / lm_head where they are 8-bit
        vocab = (getattr(cfg, "embed_bits", 16) == 8) + (getattr(cfg, "lm_head_bits", 16) == 8)
        assert describe_artifact(out)["quantized_layers"] == 14 + vocab
