"""The bad-input catalogue for ``natix-quant``: every command run with bad values and faulty files.

Each case asserts what the hardening issue asks of every user mistake: the exit status (1 for a
bad input, 2 for usage), one line on stderr naming the problem, no traceback and no "internal
error", and nothing written or changed anywhere under the test's world of inputs (checked by
snapshotting every file's bytes, mode and mtime before and after).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from natix.quant.cli import main

BAD_UTF8 = "out-\udcff"  # how Python hands click a shell argument holding the byte 0xff (tests/conftest.py)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny, cli_checks):
    """Inputs of every kind, good and bad, in one tree that no failing command may touch."""
    from natix.quant.export import export
    from natix.quant.fp8_config import Fp8Config

    root = tmp_path_factory.mktemp("world")
    base = root / "base"
    tiny.model("llama").save_pretrained(base)
    tiny.tokenizer().save_pretrained(base)
    tiny.save(tiny.model("llama"), tiny.config("lora"), root / "adapter")
    nest = root / "nest"
    nest.mkdir()
    tiny.save(tiny.model("llama"), tiny.config("lora"), nest / "adapter")
    nan = tiny.save(tiny.model("llama"), tiny.config("lora"), root / "nan-adapter")
    _poison(nan / "adapter_model.safetensors")
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": " ".join(f"w{4 + (i * 7 + j) % 120}"
                                                                         for j in range(24))}) for i in range(6)) + "\n")
    (root / "calibdir").mkdir()
    shutil.copy(root / "calib.jsonl", root / "calibdir" / "c.jsonl")
    (root / "bad.jsonl").write_text("{not json\n")
    (root / "text.txt").write_text(" ".join(f"w{4 + i % 100}" for i in range(300)))
    fp8 = export(str(base), Fp8Config(), root / "fp8", dtype="fp32").out
    weights = (fp8 / "model.safetensors").read_bytes()
    for name, data in (("trunc", weights[: len(weights) // 2]), ("random", os.urandom(len(weights)))):
        shutil.copytree(fp8, root / name)
        (root / name / "model.safetensors").write_bytes(data)
    # a manifest that says fp8 over the plain fp32 tensors of the base
    shutil.copytree(base, root / "liar")
    shutil.copy(fp8 / "natix_manifest.json", root / "liar")
    for name, edit in (("badjson", lambda m: "{oops"),
                       ("badlayers", lambda m: json.dumps({**m, "details": {**m["details"], "layers": [1]}})),
                       ("badbase", lambda m: json.dumps({**m, "base": 7}))):
        shutil.copytree(fp8, root / name)
        (root / name / "natix_manifest.json").write_text(edit(json.loads((fp8 / "natix_manifest.json").read_text())))
    shutil.copytree(base, root / "truncbase")
    st = root / "truncbase" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    (root / "existing").mkdir()
    (root / "existing" / "mine.txt").write_text("keep me")
    ro_ok = cli_checks.make_unwritable(root / "ro")
    yield root, ro_ok
    cli_checks.release_unwritable(root / "ro")


def _poison(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, str(path))


# "{w}" in an argument stands for the world directory
CASES = [
    # merge ------------------------------------------------------------------------------------------
    ("merge-out-is-adapter", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out", "{w}/adapter",
                              "--force"], 1, "is the adapter"),
    ("merge-out-is-base", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out", "{w}/base",
                           "--force"], 1, "is the base model"),
    ("merge-out-contains-adapter", ["merge", "--base", "{w}/base", "--adapter", "{w}/nest/adapter", "--out",
                                    "{w}/nest", "--force"], 1, "contains the adapter"),
    ("merge-out-inside-adapter", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out",
                                  "{w}/adapter/merged"], 1, "inside the adapter directory"),
    ("merge-out-exists", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out", "{w}/fp8"], 1,
     "already exists; pass --force"),
    ("merge-force-user-dir", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out", "{w}/existing",
                              "--force"], 1, "is not a natix output"),
    ("merge-nan-adapter", ["merge", "--base", "{w}/base", "--adapter", "{w}/nan-adapter", "--out", "{w}/o"], 1,
     "NaN or infinite values"),
    ("merge-quantized-base", ["merge", "--base", "{w}/fp8", "--adapter", "{w}/adapter", "--out", "{w}/o"], 1,
     "already a quantized natix artifact"),
    ("merge-truncated-base", ["merge", "--base", "{w}/truncbase", "--adapter", "{w}/adapter", "--out", "{w}/o"], 1,
     "cannot load model"),
    ("merge-missing-adapter", ["merge", "--base", "{w}/base", "--adapter", "{w}/nope", "--out", "{w}/o"], 1,
     "does not exist"),
    ("merge-tolerance-nan", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out", "{w}/o",
                             "--tolerance", "nan"], 2, "not a finite number"),
    ("merge-dtype", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out", "{w}/o", "--dtype", "int3"],
     2, "'int3' is not one of"),
    ("merge-out-not-utf8", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out", "{w}/" + BAD_UTF8],
     2, "not valid UTF-8"),
    ("merge-out-read-only", ["merge", "--base", "{w}/base", "--adapter", "{w}/adapter", "--out", "{w}/ro/o"], 1,
     "cannot write the output"),
    # export -----------------------------------------------------------------------------------------
    ("export-out-is-adapter", ["export", "--base", "{w}/base", "--adapter", "{w}/adapter", "--scheme", "fp8",
                               "--out", "{w}/adapter", "--force"], 1, "is the adapter"),
    ("export-out-is-calib", ["export", "--base", "{w}/base", "--scheme", "gptq", "--calib", "{w}/calib.jsonl",
                             "--out", "{w}/calib.jsonl", "--force"], 1, "is the calibration file"),
    ("export-out-contains-calib", ["export", "--base", "{w}/base", "--scheme", "gptq", "--calib",
                                   "{w}/calibdir/c.jsonl", "--out", "{w}/calibdir", "--force"], 1,
     "contains the calibration file"),
    ("export-out-is-base", ["export", "--base", "{w}/base", "--scheme", "fp8", "--out", "{w}/base", "--force"], 1,
     "is the base model"),
    ("export-force-user-file", ["export", "--base", "{w}/base", "--scheme", "fp8", "--out", "{w}/text.txt",
                                "--force"], 1, "is not a natix output"),
    ("export-quantized-base", ["export", "--base", "{w}/fp8", "--scheme", "fp8", "--out", "{w}/o"], 1,
     "already a quantized natix artifact"),
    ("export-nan-adapter", ["export", "--base", "{w}/base", "--adapter", "{w}/nan-adapter", "--scheme", "fp8",
                            "--out", "{w}/o"], 1, "NaN or infinite values"),
    ("export-group-7", ["export", "--base", "{w}/base", "--scheme", "gptq", "--group-size", "7", "--calib",
                        "{w}/calib.jsonl", "--out", "{w}/o"], 1, "power of two"),
    ("export-group-100000", ["export", "--base", "{w}/base", "--scheme", "gptq", "--group-size", "100000", "--calib",
                             "{w}/calib.jsonl", "--out", "{w}/o"], 1, "power of two"),
    ("export-group-fits-no-layer", ["export", "--base", "{w}/base", "--scheme", "gptq", "--group-size", "1024",
                                    "--calib", "{w}/calib.jsonl", "--out", "{w}/o"], 1,
     "divides the input width of none of the layers"),
    ("export-calib-samples-negative", ["export", "--base", "{w}/base", "--scheme", "fp8", "--calib-samples", "-5",
                                       "--out", "{w}/o"], 2, "-5 is not in the range"),
    ("export-calib-max-length", ["export", "--base", "{w}/base", "--scheme", "gptq", "--calib-max-length", "1",
                                 "--out", "{w}/o"], 2, "1 is not in the range"),
    ("export-calib-missing", ["export", "--base", "{w}/base", "--scheme", "gptq", "--calib", "{w}/nope.jsonl",
                              "--out", "{w}/o"], 1, "does not exist"),
    ("export-calib-not-json", ["export", "--base", "{w}/base", "--scheme", "gptq", "--calib", "{w}/bad.jsonl",
                               "--out", "{w}/o"], 1, "not valid JSON"),
    ("export-scheme", ["export", "--base", "{w}/base", "--scheme", "int3", "--out", "{w}/o"], 1, "known schemes"),
    ("export-set-syntax", ["export", "--base", "{w}/base", "--scheme", "w4a8kv4", "--set", "rotate", "--out",
                           "{w}/o"], 1, "expected FIELD=VALUE"),
    ("export-set-type", ["export", "--base", "{w}/base", "--scheme", "w4a8kv4", "--set", "rotate=maybe", "--out",
                         "{w}/o"], 1, "rotate must be true or false"),
    ("export-out-not-utf8", ["export", "--base", "{w}/base", "--scheme", "fp8", "--out", "{w}/" + BAD_UTF8], 2,
     "not valid UTF-8"),
    ("export-out-read-only", ["export", "--base", "{w}/base", "--scheme", "fp8", "--out", "{w}/ro/o"], 1,
     "cannot write the output"),
    # inspect ----------------------------------------------------------------------------------------
    ("inspect-random-bytes", ["inspect", "{w}/random"], 1, "not a readable safetensors file"),
    ("inspect-truncated", ["inspect", "{w}/trunc"], 1, "not a readable safetensors file"),
    ("inspect-scheme-disagrees", ["inspect", "{w}/liar"], 1, "is not a fp8 checkpoint as its manifest says"),
    ("inspect-manifest-not-json", ["inspect", "{w}/badjson"], 1, "cannot read artifact manifest"),
    ("inspect-manifest-layers", ["inspect", "{w}/badlayers"], 1, "details.layers must map"),
    ("inspect-manifest-base", ["inspect", "{w}/badbase"], 1, "'base' must be a mapping"),
    ("inspect-missing", ["inspect", "{w}/nope"], 1, "not a directory"),
    # eval -------------------------------------------------------------------------------------------
    ("eval-dtype", ["eval", "{w}/fp8", "--dtype", "foo"], 2, "'foo' is not one of"),
    ("eval-device", ["eval", "{w}/fp8", "--device", "foo"], 2, "'foo' is not a device"),
    ("eval-task", ["eval", "{w}/fp8", "--ppl", "{w}/text.txt", "--task", "nope"], 1, "unknown task 'nope'"),
    ("eval-strategy", ["eval", "{w}/fp8", "--ppl", "{w}/text.txt", "--task", "chain_sum", "--strategy", "maj@x"], 1,
     "maj@x"),
    ("eval-strategy-without-task", ["eval", "{w}/fp8", "--strategy", "greedy"], 2, "--strategy needs --task"),
    ("eval-items-zero", ["eval", "{w}/fp8", "--task", "chain_sum", "--items", "0"], 2, "0 is not in the range"),
    ("eval-items-negative", ["eval", "{w}/fp8", "--task", "chain_sum", "--items", "-1"], 2, "-1 is not in the range"),
    ("eval-temperature-nan", ["eval", "{w}/fp8", "--temperature", "nan"], 2, "not a finite number"),
    ("eval-temperature-inf", ["eval", "{w}/fp8", "--temperature", "inf"], 2, "not a finite number"),
    ("eval-temperature-zero", ["eval", "{w}/fp8", "--temperature", "0"], 2, "not in the range"),
    ("eval-ppl-max-length", ["eval", "{w}/fp8", "--ppl-max-length", "1"], 2, "not in the range"),
    ("eval-ppl-windows", ["eval", "{w}/fp8", "--ppl-windows", "-1"], 2, "not in the range"),
    ("eval-truncated", ["eval", "{w}/trunc", "--ppl", "{w}/text.txt"], 1, "not a readable safetensors file"),
    ("eval-random", ["eval", "{w}/random", "--ppl", "{w}/text.txt"], 1, "not a readable safetensors file"),
    ("eval-scheme-disagrees", ["eval", "{w}/liar", "--ppl", "{w}/text.txt"], 1, "is not a fp8 checkpoint"),
    ("eval-adapter-on-artifact", ["eval", "{w}/fp8", "--adapter", "{w}/adapter"], 1, "cannot be merged into it"),
    ("eval-missing-model", ["eval", "{w}/nope"], 1, "not found"),
    ("eval-missing-text", ["eval", "{w}/fp8", "--ppl", "{w}/nope.txt"], 1, "cannot read perplexity text"),
    ("eval-jsonl-is-text", ["eval", "{w}/fp8", "--ppl", "{w}/text.txt", "--jsonl", "{w}/text.txt"], 1,
     "is the perplexity text"),
    ("eval-jsonl-inside-model", ["eval", "{w}/fp8", "--ppl", "{w}/text.txt", "--jsonl", "{w}/fp8/rows.jsonl"], 1,
     "inside the model directory"),
    ("eval-jsonl-read-only", ["eval", "{w}/fp8", "--ppl", "{w}/text.txt", "--jsonl", "{w}/ro/rows.jsonl"], 1,
     "is not writable"),
    ("eval-jsonl-not-utf8", ["eval", "{w}/fp8", "--jsonl", "{w}/" + BAD_UTF8], 2, "not valid UTF-8"),
]


@pytest.mark.parametrize(("args", "code", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(world, cli_checks, monkeypatch, tmp_path, args, code, needle):
    root, ro_ok = world
    if "{w}/ro/" in " ".join(args) and not ro_ok:
        pytest.skip("cannot make a read-only directory here")
    if "--device" in args and "cuda" in args:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has CUDA")
    monkeypatch.setenv("NATIX_CACHE", str(tmp_path / "cache"))
    before = cli_checks.snapshot(root)
    cli_checks.check_refused(cli_checks.run_case(main, args, root), code, needle)
    assert cli_checks.snapshot(root) == before


def test_eval_validates_task_before_perplexity(world, cli_checks, monkeypatch):
    """A bad --task must fail before perplexity runs (it used to, after minutes of it)."""
    import natix.quant.evaluate as ev

    root, _ = world

    def never(*a, **k):
        raise AssertionError("perplexity ran before the task was checked")

    monkeypatch.setattr(ev, "perplexity", never)
    res = cli_checks.run_case(main, ["eval", "{w}/fp8", "--ppl", "{w}/text.txt", "--task", "chain_sum", "--strategy",
                                     "bo8:nope"], root)
    cli_checks.check_refused(res, 1, "unknown scorer 'nope'")


def test_no_cuda_device_is_a_clear_error(world, cli_checks):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root, _ = world
    cli_checks.check_refused(cli_checks.run_case(main, ["eval", "{w}/fp8", "--device", "cuda"], root), 1,
                             "no CUDA device is available")


def test_debug_shows_the_traceback(world, cli_checks):
    from natix.quant.errors import ArtifactError

    root, _ = world
    for argv in (["--debug", "inspect", "{w}/random"], ["inspect", "{w}/random", "--debug"]):
        res = cli_checks.run_case(main, argv, root)
        assert res.exit_code == 1 and isinstance(res.exception, ArtifactError), (argv, res.exception)


def test_a_bug_is_reported_as_one(world, cli_checks, monkeypatch):
    import natix.quant.loader as loader

    def broken(path):
        raise KeyError("oops")

    monkeypatch.setattr(loader, "describe_artifact", broken)
    res = cli_checks.run_case(main, ["inspect", "{w}/fp8"], world[0])
    assert res.exit_code == 1 and "internal error" in res.stderr and "--debug" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
