"""The wheel and the editable install agree, and `natix.*` never binds to a PyPI namesake."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOTS = ("quant", "kernels", "engines", "scaling", "bench")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    cfg = _pyproject()["tool"]["setuptools"]
    listed, mapping = set(cfg["packages"]), cfg["package-dir"]
    for root in ROOTS:
        for init in (ROOT / root).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            name = "natix." + ".".join(rel.parts)
            assert name in listed, f"{rel} has an __init__.py but {name} is not in pyproject packages"
        assert mapping[f"natix.{root}"] == root
    for name in listed:
        folder = ROOT / Path(*name.split(".")[1:])
        assert (folder / "__init__.py").is_file(), f"{name} is listed but {folder} is no package"


def test_natix_kernels_is_ours_not_hf_kernels() -> None:
    # In a fresh interpreter with the repo root NOT on sys.path (as in CI: PYTHONSAFEPATH=1),
    # so a stray top-level `kernels` folder cannot shadow anything.
    code = ("import natix.kernels, natix.quant, natix.engines, natix.scaling, natix.bench, sys;"
            "print(natix.kernels.__file__);"
            "print('kernels' in sys.modules and getattr(sys.modules['kernels'], '__file__', ''))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         cwd=ROOT.parent, check=True).stdout.split("\n")
    assert Path(out[0]).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert out[1] in ("False", ""), f"a top-level `kernels` module was imported: {out[1]}"


def test_import_is_light() -> None:
    code = ("import sys; import natix.quant, natix.kernels, natix.engines, natix.scaling, natix.bench;"
            "import natix.quant.cli, natix.bench.cli, natix.engines.hf_engine, natix.engines.base;"
            "import natix.engines.vllm_plugin, natix.engines.vllm_plugin.artifact, natix.engines.vllm_engine;"
            "heavy = [m for m in ('torch', 'transformers', 'triton', 'peft', 'vllm', 'kvpress') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing natix pulled in: {out.stdout.strip()}"


@pytest.mark.slow
def test_wheel_contains_every_package(tmp_path: Path) -> None:
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("natix-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in _pyproject()["tool"]["setuptools"]["packages"]:
        assert "/".join(name.split(".")) + "/__init__.py" in names
    assert any(n.startswith("natix/bench/data/adapters/smollm2-chain-sum-lora/adapter_model") for n in names)
    assert not any(n.startswith(("kernels/", "quant/", "tests/")) for n in names)
