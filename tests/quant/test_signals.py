"""Faults during merge, export and the GGUF conversion: SIGTERM cleans up at once, ``kill -9``
debris is removed (and reported) by the next run, and that run completes. Real processes and
real signals, on the tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = "import sys; from natix.quant.cli import main; sys.argv[0] = 'natix-quant'; main()"


def start(args: list[str], *, prelude: str = "", env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", prelude + CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for(pattern: str, where: Path, proc: subprocess.Popen, timeout: float = 120.0) -> Path:
    """The first entry of ``where`` matching ``pattern`` once it appears (while ``proc`` runs)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        hits = sorted(where.glob(pattern)) if where.is_dir() else []
        if hits:
            return hits[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {pattern} appeared in {where}: {err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{pattern} did not appear in {where}")


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture
def job(wide_base, calib_file, tmp_path):
    """A gptq export of the wide tiny base (calibrated, so it runs a few seconds after its temp
    directory appears) into tmp_path/outs/q."""
    outs = tmp_path / "outs"
    outs.mkdir()
    return outs, ["export", "--base", wide_base, "--scheme", "gptq", "--calib", calib_file, "--calib-samples", "8",
                  "--out", outs / "q", "--dtype", "fp32"]


def test_sigterm_during_export_leaves_nothing(job):
    outs, args = job
    proc = start(args)
    wait_for(".natix-tmp-q-*", outs, proc)
    rc, err = stop(proc, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert "terminated by SIGTERM" in err and "Traceback" not in err, err
    assert list(outs.iterdir()) == []


def test_kill_9_during_export_is_cleaned_up_by_the_next_run(job):
    outs, args = job
    proc = start(args)
    tmp = wait_for(".natix-tmp-q-*", outs, proc)
    rc, _ = stop(proc, signal.SIGKILL)
    assert rc == -signal.SIGKILL and tmp.is_dir()  # the debris a kill -9 leaves
    rerun = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed stale temporary directory {tmp}" in " ".join(rerun.stderr.split()), rerun.stderr
    assert [p.name for p in outs.iterdir()] == ["q"]
    assert (outs / "q" / "natix_manifest.json").is_file()


def test_sigterm_during_merge_leaves_nothing(base_dirs, make_adapter, tmp_path):
    outs = tmp_path / "outs"
    outs.mkdir()
    proc = start(["merge", "--base", base_dirs["llama"], "--adapter", make_adapter("llama", "lora"), "--out",
                  outs / "m"])
    wait_for(".natix-tmp-m-*", outs, proc)
    rc, err = stop(proc, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "terminated by SIGTERM" in err, err
    assert list(outs.iterdir()) == []


# A GGUF "conversion" that takes its time: the real one needs the 135M model (~40 s); what is under
# test is the cache's temp directory, not the conversion.
SLOW_CONVERT = """
import time, natix.quant.models as models
def _slow(src, out):
    out.mkdir(parents=True)
    (out / "weights.bin").write_bytes(b"0" * 1000)
    time.sleep(60)
models._convert_gguf = _slow
"""


def test_gguf_conversion_sigterm_and_kill_9(tmp_path, monkeypatch, caplog):
    from natix.quant.models import materialize, resolve_base

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    env = {"NATIX_CACHE": str(cache)}
    models = cache / "models"
    # SIGTERM while a CLI converts: the temp directory goes with the process
    proc = start(["export", "--base", gguf, "--scheme", "fp8", "--out", tmp_path / "o"], prelude=SLOW_CONVERT, env=env)
    wait_for(".tmp-*/m/weights.bin", models, proc)
    rc, err = stop(proc, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert list(models.iterdir()) == [] and not (tmp_path / "o").exists()
    # kill -9: the debris stays until the next conversion, which removes it and says so
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT + "from natix.quant.models import materialize, "
                             f"resolve_base; materialize(resolve_base({str(gguf)!r}))"],
                            env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
    tmp = wait_for(".tmp-*/m/weights.bin", models, proc).parent.parent
    stop(proc, signal.SIGKILL)
    assert tmp.is_dir()

    def quick(src, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setenv("NATIX_CACHE", str(cache))
    monkeypatch.setattr("natix.quant.models._convert_gguf", quick)
    with caplog.at_level("WARNING", logger="natix"):
        target = materialize(resolve_base(str(gguf)))
    assert f"removed stale temporary directory {tmp}" in caplog.text
    assert [p.name for p in models.iterdir()] == [target.name]
