"""Issue 12 §4: every bad input answered before any compute, as one ``error:`` line, exit 2, no run left behind;
and the inputs that used to be misread (pipes, files named like keywords, NUL bytes, odd folder names) now work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from headlab.cli import analyze_app, headlab_app
from headlab.result import Result
from headlab.zoo.tiny import build_tiny

runner = CliRunner()
BASE = ["--n-prompts", "2", "--max-tokens", "16", "--quiet", "--model", "tiny-qwen3"]


def _save_tiny(folder: Path, *, weights: bool = True, tokenizer: bool = True) -> Path:
    model, tok = build_tiny("tiny-llama")
    if weights:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.config.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _copy(folder: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, dest))


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/proc/headlab-runs")  # root ignores permission bits; /proc refuses new files to everyone
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "runs"


def _cases(tmp_path: Path, tiny: Path) -> dict[str, tuple[list[str], str]]:
    truncated = _copy(tiny, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    corrupt = _copy(tiny, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    no_tokenizer = _save_tiny(tmp_path / "no-tokenizer", tokenizer=False)
    bad_config = _copy(tiny, tmp_path / "bad-config")
    (bad_config / "config.json").write_text("{\"model_type\": \"llama\",")
    custom = _copy(tiny, tmp_path / "custom-code")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_mine.MyConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a real prompt\n\x00\x00\n")
    return {
        "unknown dtype": (["--dtype", "float64"], "unknown --dtype 'float64'"),
        "truncated safetensors": (["--model", str(truncated)], "is truncated"),
        "corrupt safetensors": (["--model", str(corrupt)], "not a valid safetensors file"),
        "missing tokenizer": (["--model", str(no_tokenizer)], "no tokenizer files"),
        "invalid config.json": (["--model", str(bad_config)], "is not valid JSON"),
        "custom code": (["--model", str(custom)], "--trust-remote-code"),
        "revision on a local folder": (["--model", str(tiny), "--revision", "main"], "applies to hub ids only"),
        "read-only out": (["--out", str(_unwritable(tmp_path))], "cannot write runs to"),
        "over-long name": (["--name", "r" * 200], "at most 120"),
        "generate fills max-tokens": (["--generate", "16"], "leaves no room for the prompt"),
        "prompt only NUL bytes": (["--prompts", str(nul)], "holds only NUL bytes"),
        "threads zero": (["--threads", "0"], "--threads must be at least 1"),
    }


CASES = ["unknown dtype", "truncated safetensors", "corrupt safetensors", "missing tokenizer", "invalid config.json",
         "custom code", "revision on a local folder", "read-only out", "over-long name", "generate fills max-tokens",
         "prompt only NUL bytes", "threads zero"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(tmp_path, tiny_folder, case):
    args, message = _cases(tmp_path, tiny_folder)[case]
    out = tmp_path / "runs"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    result = runner.invoke(analyze_app, ["sinks", *BASE, *args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and message in text, text
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir()), "a failed run must leave nothing behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_before_loading(tmp_path, monkeypatch):
    import headlab.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(headlab.loading, "load", no_load)
    result = runner.invoke(analyze_app, ["position-bias", *BASE, "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no usable CUDA GPU" in result.output, result.output


def test_generate_on_an_encoder(tmp_path):
    result = runner.invoke(analyze_app, ["sinks", *BASE, "--model", "minilm", "--generate", "4", "--out",
                                         str(tmp_path)])
    assert result.exit_code == 2 and "needs a causal language model" in result.output, result.output
    assert not any(tmp_path.iterdir())


def test_generate_beyond_max_tokens_raises_the_cap_and_says_so(tmp_path):
    # Byte tokenizer: the bundled prompts are longer than 16 tokens, so 16 + 4 are needed.
    result = runner.invoke(analyze_app, ["sinks", *BASE, "--generate", "4", "--out", str(tmp_path), "--name", "g"])
    assert result.exit_code == 0, result.output
    assert "--max-tokens raised from 16 to 20" in " ".join(result.output.split())
    assert Result.load(tmp_path / "g").config["max_tokens"] == 20


def test_zoo_train_threads_zero(tmp_path):
    result = runner.invoke(headlab_app, ["zoo", "train", "--threads", "0", "--steps", "1", "--checkpoint",
                                         str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error:") and "--threads must be at least 1" in result.output
    assert not (tmp_path / "m").exists()


def test_default_name_from_an_unusual_folder(tmp_path, tiny_folder):
    odd = _copy(tiny_folder, tmp_path / "my model [v2] ü")
    out = tmp_path / "runs"
    result = runner.invoke(analyze_app, ["sinks", *BASE, "--model", str(odd), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (run,) = out.iterdir()
    assert run.name.startswith("sinks-my-model-v2-u-"), run.name
    assert Result.load(run).model == str(odd)


def test_prompts_from_a_pipe(tmp_path):
    read, write = os.pipe()
    os.write(write, b"first prompt from a pipe\nsecond prompt\n")
    os.close(write)
    try:
        result = runner.invoke(analyze_app, ["sinks", *BASE, "--prompts", f"/dev/fd/{read}", "--out", str(tmp_path),
                                             "--name", "p"])
    finally:
        os.close(read)
    assert result.exit_code == 0, result.output
    run = Result.load(tmp_path / "p")
    assert run.prompts == ["first prompt from a pipe", "second prompt"]
    assert run.provenance["prompts"]["source"] == {"kind": "pipe", "path": f"/dev/fd/{read}"}


def test_a_real_file_named_like_a_keyword_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bundled").write_text("my own prompt one\nmy own prompt two\n")
    result = runner.invoke(analyze_app, ["sinks", *BASE, "--prompts", "bundled", "--out", "runs", "--name", "k"])
    assert result.exit_code == 0, result.output
    run = Result.load(tmp_path / "runs" / "k")
    assert run.prompts == ["my own prompt one", "my own prompt two"]
    assert run.provenance["prompts"]["source"]["kind"] == "file"


def test_nul_bytes_inside_a_prompt_are_removed():
    from headlab.prompts import parse_prompts

    assert parse_prompts("ab\x00cd\n") == ["abcd"]


def test_tiny_max_tokens_warns_and_mean_length_is_printed(tmp_path):
    result = runner.invoke(analyze_app, ["sinks", *BASE, "--max-tokens", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: --max-tokens 4 is below 8 tokens per prompt" in text
    assert "T <= 4, mean 4.0 tokens per prompt" in text


def test_short_prompts_far_below_max_tokens_are_flagged(tmp_path):
    prompts = tmp_path / "short.txt"
    prompts.write_text("hello there\nhi you\n")
    result = runner.invoke(analyze_app, ["sinks", *BASE, "--max-tokens", "64", "--prompts", str(prompts), "--out",
                                         str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "T <= 64, mean" in text and "far below --max-tokens 64" in text


def test_a_string_passed_as_prompts_in_python(load_model):
    from headlab.analyses.sinks import analyze_sinks
    from headlab.errors import PromptError

    with pytest.raises(PromptError, match="single string"):
        analyze_sinks(load_model("tiny-llama"), "a single prompt")
    with pytest.raises(PromptError, match="prompt 1 is a int"):
        analyze_sinks(load_model("tiny-llama"), ["fine", 3])


SIGTERM_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from headlab.cli.apps import _on_sigterm
    from headlab.runs import write_run

    _on_sigterm()  # what every CLI command installs

    def write(tmp):
        (tmp / "report.md").write_text("half")
        print("writing", flush=True)
        time.sleep(60)
        return {}

    write_run(Path(sys.argv[1]), "victim", write)
""")


def test_sigterm_while_a_run_is_written_leaves_nothing(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_WRITER, str(runs)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".victim.tmp-") for p in runs.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(runs.iterdir()) == [], "the temporary run is removed, as on Ctrl+C"


def test_runs_clean_removes_leftovers_of_dead_writers_only(tmp_path):
    import socket

    runs = tmp_path / "runs"
    dead, alive, unknown = (runs / f".r{i}.tmp-0000000{i}" for i in range(3))
    for folder in (dead, alive, unknown):
        folder.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that has exited
    (dead / ".writer.json").write_text(json.dumps({"pid": child.pid, "host": socket.gethostname()}))
    (alive / ".writer.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    (runs / "complete-run").mkdir()
    dry = runner.invoke(headlab_app, ["runs", "clean", "--runs", str(runs), "--dry-run"])
    assert dry.exit_code == 0 and "2 leftover(s) would remove" in dry.output and dead.exists()
    result = runner.invoke(headlab_app, ["runs", "clean", "--runs", str(runs)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in runs.iterdir()) == sorted([alive.name, "complete-run"])
    assert "still being written" in result.output


@pytest.mark.parametrize(("env", "value", "message"), [
    ("HEADLAB_FUSED_ROWS", "fast", "$HEADLAB_FUSED_ROWS must be auto, on or off, got 'fast'"),
    ("HEADLAB_CHUNK_ROWS", "lots", "$HEADLAB_CHUNK_ROWS must be a whole number of query rows, got 'lots'"),
    ("HEADLAB_KERNEL_THREADS", "many", "$HEADLAB_KERNEL_THREADS must be auto or a number of threads"),
    ("HEADLAB_ATTN_BACKEND", "fastest", "unknown attention backend 'fastest'"),
])
def test_bad_kernel_environment_is_refused_before_loading(tmp_path, monkeypatch, env, value, message):
    import headlab.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(headlab.loading, "load", no_load)
    monkeypatch.setenv(env, value)
    result = runner.invoke(analyze_app, ["sinks", *BASE, "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and message in text, text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
