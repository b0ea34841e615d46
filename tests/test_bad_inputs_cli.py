"""Issue 25: the bad inputs left after issue 12, on the command line: one ``error:`` line naming the flag the
user typed, exit 2, nothing written; and two runs finishing at once with one name."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from headlab.cli import analyze_app, headlab_app
from headlab.errors import RunStoreError
from headlab.runs import write_run

runner = CliRunner()
FAST = ["--model", "tiny-llama", "--n-prompts", "2", "--max-tokens", "16", "--quiet", "--threads", "1"]


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_second_run_with_the_same_name_is_refused_not_a_traceback(tmp_path):
    """Two runs with one name both pass the up-front check; the one that finishes second gets a clean error and
    leaves the first run and no temporary folder behind (the rename used to raise ENOTEMPTY)."""
    def first(tmp: Path) -> dict:
        (tmp / "mark").write_text("first")
        return {}

    def second(tmp: Path) -> dict:
        write_run(tmp_path, "same", first)  # the other run finishes while this one computes
        (tmp / "mark").write_text("second")
        return {}

    with pytest.raises(RunStoreError, match="written by another run while this one computed"):
        write_run(tmp_path, "same", second)
    assert [p.name for p in tmp_path.iterdir()] == ["same"]
    assert (tmp_path / "same" / "mark").read_text() == "first"


def test_an_empty_folder_in_the_way_is_not_replaced(tmp_path):
    def write(tmp: Path) -> dict:
        (tmp_path / "late").mkdir()
        return {}

    with pytest.raises(RunStoreError, match="another --name"):
        write_run(tmp_path, "late", write)
    assert [p.name for p in tmp_path.iterdir()] == ["late"] and not any((tmp_path / "late").iterdir())


def test_runs_env_pointing_at_a_file_names_the_variable(tmp_path, monkeypatch):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("x")
    monkeypatch.setenv("HEADLAB_RUNS", str(a_file))
    line = one_error_line(runner.invoke(analyze_app, ["sinks", *FAST]), "$HEADLAB_RUNS", "existing file")
    assert "--out" not in line


def test_runs_clean_names_its_own_flag_and_refuses_a_missing_folder(tmp_path):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("x")
    line = one_error_line(runner.invoke(headlab_app, ["runs", "clean", "--runs", str(a_file)]), "--runs")
    assert "--out" not in line
    one_error_line(runner.invoke(headlab_app, ["runs", "clean", "--runs", str(tmp_path / "typo")]),
                   "no such folder")
    (tmp_path / "real").mkdir()
    result = runner.invoke(headlab_app, ["runs", "clean", "--runs", str(tmp_path / "real")])
    assert result.exit_code == 0 and "0 leftover(s) removed" in result.output


def test_offload_folder_that_is_a_file(tmp_path):
    a_file = tmp_path / "offload"
    a_file.write_text("x")
    one_error_line(runner.invoke(analyze_app, ["sinks", *FAST, "--device-map", "auto", "--offload-folder",
                                               str(a_file), "--out", str(tmp_path / "runs")]),
                   "--offload-folder", "existing file")
    assert not (tmp_path / "runs").exists()


def test_no_noise_from_transformers_on_lvlm_and_long_prompts(tmp_path):
    """No torchvision fallback warning when an LVLM's processor is built, and one headlab line (not transformers'
    "Token indices sequence length" warning) when --max-tokens cuts prompts."""
    import subprocess
    import sys

    lvlm = subprocess.run([sys.executable, "-c", "import headlab; from headlab.lvlm import processor_of; "
                           "processor_of(headlab.load('tiny-llava'))"], capture_output=True, text=True, timeout=300)
    assert lvlm.returncode == 0, lvlm.stderr
    assert "torchvision" not in lvlm.stderr
    prompts = tmp_path / "long.txt"
    prompts.write_text("the cat sat on the mat " * 400 + "\nshort one here and there\n")
    sinks = subprocess.run([str(Path(sys.executable).with_name("analyze")), "sinks", "--model", "tiny-llama",
                            "--prompts", str(prompts), "--max-tokens", "16", "--quiet", "--threads", "1", "--out",
                            str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert sinks.returncode == 0, sinks.stderr
    assert "Token indices sequence length" not in sinks.stderr, sinks.stderr
    assert "note: 2 of 2 prompts are longer than --max-tokens 16 tokens" in " ".join(sinks.stderr.split())


def test_hallucination_with_missing_images_refuses_then_counts_what_it_evaluated(tmp_path):
    """6 of the annotated images gone: refused by name before the model loads; with --allow-missing-images the
    run evaluates the others and says how many (it used to print n = 20 and evaluate 14, silently)."""
    from headlab.result import Result
    from headlab.training import lvlm_data as D

    data = tmp_path / "set"
    D.write_dataset(data, D.eval_scenes("weak", 5))
    images = sorted((data / "images").iterdir())
    images[0].unlink()
    images[3].unlink()
    args = ["hallucination", "--model", "tiny-llava", "--data", str(data), "--methods", "none", "--n", "5",
            "--max-new-tokens", "2", "--resamples", "20", "--quiet", "--threads", "1", "--out", str(tmp_path / "runs")]
    line = one_error_line(runner.invoke(analyze_app, [*args, "--name", "refused"]), "2 of 5 annotated images",
                          images[0].name, "--allow-missing-images")
    assert "n = 5" not in line and not (tmp_path / "runs").exists()
    result = runner.invoke(analyze_app, [*args, "--name", "allowed", "--allow-missing-images"])
    assert result.exit_code == 0, result.output
    run = Result.load(tmp_path / "runs" / "allowed")
    assert sorted(run.tables["missing_images"].iloc[:, 0]) == sorted([images[0].name, images[3].name])
    assert "n = 3 images" in run.report and "no verdict" not in run.report.split("warning")[0]
    assert "too few" in " ".join(result.output.split())


def test_a_model_given_by_path_is_named_by_its_folder_in_tables_and_reports(tmp_path):
    """The printed table, the report and the figure titles name ``my-model``, never ``/tmp/.../my-model``
    (the manifest keeps the path the user passed, for reproducibility)."""
    from headlab.result import Result
    from headlab.zoo.tiny import build_tiny

    model, tok = build_tiny("tiny-llama")
    folder = tmp_path / "deep" / "my-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    result = runner.invoke(analyze_app, ["sinks", "--model", str(folder), "--n-prompts", "2", "--max-tokens", "16",
                                         "--quiet", "--threads", "1", "--out", str(tmp_path / "runs"), "--name", "r"],
                           terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "Top sink heads: my-model" in result.output
    run = Result.load(tmp_path / "runs" / "r")
    assert run.model == str(folder) and str(tmp_path) not in run.report.splitlines()[0]
    titles = [fig.layout.title.text or "" for fig in run.figures.values()]
    assert titles and not any(str(tmp_path) in title for title in titles)
