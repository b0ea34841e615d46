"""The command line's one way to open a model: the same model flags on every command that loads one, one
opening function behind them, ``--kernel`` / ``--runtime`` (``--backend`` a deprecated alias), and the
analysis registry's generic command for an analysis without hand-written options."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import headlab
from headlab.analyses import registry
from headlab.cli import analyze_app, headlab_app
from headlab.cli.generic import generic_command
from headlab.errors import InputError
from headlab.result import Result

runner = CliRunner()
MODEL_FLAGS = {"--model", "--dtype", "--device", "--device-map", "--max-memory", "--offload-folder", "--threads",
               "--offline", "--revision", "--trust-remote-code", "--bos", "--kernel", "--runtime", "--remote",
               "--backend"}
# Every command that loads a model: (group, path to the command).
LOADING = [(analyze_app, ["sinks"]), (analyze_app, ["position-bias"]), (analyze_app, ["circuits"]),
           (analyze_app, ["vhd"]), (analyze_app, ["hallucination"]), (headlab_app, ["fix"]),
           (headlab_app, ["lofit", "select"]), (headlab_app, ["lofit", "train"]), (headlab_app, ["lofit", "apply"]),
           (headlab_app, ["lofit", "export"]), (headlab_app, ["lofit", "eval"])]


def _command(app, path):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _flags(command) -> set[str]:
    return {opt for param in command.params for opt in param.opts if opt.startswith("--")}


@pytest.mark.parametrize(("app", "path"), LOADING, ids=lambda p: " ".join(p) if isinstance(p, list) else "")
def test_every_loading_command_takes_the_same_model_flags(app, path):
    command = _command(app, path)
    assert MODEL_FLAGS <= _flags(command)
    panels = {param.name: getattr(param, "rich_help_panel", None) for param in command.params}
    assert {panels[f.lstrip("-").replace("-", "_")] for f in MODEL_FLAGS} == {"Model and placement"}
    help_text = " ".join(runner.invoke(app, [*path, "--help"], terminal_width=200).output.split())
    assert "Model and placement" in help_text and "--device-map" in help_text and "--backend" not in help_text


@pytest.mark.parametrize(("app", "path"), LOADING, ids=lambda p: " ".join(p) if isinstance(p, list) else "")
def test_every_loading_command_writes_a_run_into_the_runs_folder(app, path):
    """One rule (issue 25): --out is the runs folder and --name the run, on every command; each also takes
    --threads and --quiet."""
    params = {p.name: p for p in _command(app, path).params}
    assert {"out", "name", "quiet", "threads"} <= set(params)
    assert params["out"].help.startswith("runs folder") and params["name"].help.startswith("run name")


def test_zoo_train_keeps_its_checkpoint_folder_apart_from_out(tmp_path):
    params = {p.name: p for p in _command(headlab_app, ["zoo", "train"]).params}
    assert {"checkpoint", "quiet", "threads"} <= set(params) and params["out"].hidden
    result = runner.invoke(headlab_app, ["zoo", "train", "--steps", "0", "--out", str(tmp_path / "m")])
    assert "--out of `zoo train` is deprecated: use --checkpoint" in " ".join(result.output.split())


def test_the_model_flags_read_the_same_everywhere():
    helps = []
    for app, path in LOADING:
        params = {p.name: p for p in _command(app, path).params}
        helps.append({name: params[name].help for name in ("device_map", "max_memory", "kernel", "runtime", "bos")})
    assert all(h == helps[0] for h in helps)


class _Stop(Exception):
    pass


def test_every_command_opens_its_model_the_same_way(tmp_path, monkeypatch):
    """The flags reach ``headlab.load`` unchanged, whatever the command."""
    calls = []

    def fake_load(name, **kwargs):
        calls.append(kwargs)
        raise InputError("stopped before loading")

    monkeypatch.setattr("headlab.loading.load", fake_load)
    image = tmp_path / "im.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    flags = ["--model", "tiny-llava", "--dtype", "float32", "--device", "cpu", "--bos", "add", "--revision", "r1",
             "--trust-remote-code", "--offline", "--device-map", "auto", "--max-memory", "cpu=1GiB"]
    invocations = [(analyze_app, ["sinks", "--out", str(tmp_path / "a")]),
                   (analyze_app, ["position-bias", "--out", str(tmp_path / "b")]),
                   (analyze_app, ["circuits", "--out", str(tmp_path / "c")]),
                   (headlab_app, ["fix", "--image", str(image)])]
    for app, args in invocations:
        result = runner.invoke(app, [*args, *flags])
        assert result.exit_code == 2 and "stopped before loading" in result.output, result.output
    assert len(calls) == len(invocations) and all(c == calls[0] for c in calls)
    assert calls[0]["bos"] == "add" and calls[0]["revision"] == "r1" and calls[0]["trust_remote_code"] is True
    assert calls[0]["local_files_only"] is True and calls[0]["device_map"] == "auto"
    assert calls[0]["max_memory"] == {"cpu": 2**30}


FAST = ["--model", "tiny-llama", "--n-prompts", "2", "--max-tokens", "16", "--quiet", "--threads", "1"]


def test_kernel_flag_runs_that_kernel_and_matches_the_default(tmp_path):
    for kernel in ("eager", "torch"):
        result = runner.invoke(analyze_app, ["sinks", *FAST, "--kernel", kernel, "--out", str(tmp_path),
                                             "--name", kernel])
        assert result.exit_code == 0, result.output
    eager, torch_run = Result.load(tmp_path / "eager"), Result.load(tmp_path / "torch")
    assert eager.provenance["settings"]["backend"] == "eager" and torch_run.provenance["settings"]["backend"] == "torch"
    import torch

    torch.testing.assert_close(eager.tensors["alpha"], torch_run.tensors["alpha"], rtol=0, atol=1e-5, equal_nan=True)


def test_backend_is_a_deprecated_alias_with_one_line(tmp_path):
    result = runner.invoke(analyze_app, ["sinks", *FAST, "--backend", "eager", "--out", str(tmp_path), "--name", "b"])
    assert result.exit_code == 0, result.output
    assert result.output.count("--backend eager is deprecated: use --kernel eager") == 1
    assert Result.load(tmp_path / "b").provenance["settings"]["backend"] == "eager"
    nn = runner.invoke(analyze_app, ["sinks", *FAST, "--backend", "nnsight", "--out", str(tmp_path), "--name", "n"])
    assert nn.exit_code == 0 and "use --runtime nnsight" in nn.output, nn.output
    assert Result.load(tmp_path / "n").provenance["settings"]["backend"] == "nnsight"


@pytest.mark.parametrize("args", [["analyze", "vhd"], ["analyze", "hallucination"], ["headlab", "fix"],
                                  ["analyze", "circuits"]])
def test_local_only_commands_refuse_the_nnsight_runtime_before_loading(args, tmp_path, monkeypatch):
    monkeypatch.setattr("headlab.loading.load", lambda *a, **k: pytest.fail("loaded a model"))
    app = analyze_app if args[0] == "analyze" else headlab_app
    extra = {"vhd": ["--images", str(tmp_path), "--prompts", str(tmp_path / "p.txt")],
             "hallucination": ["--data", str(tmp_path)], "fix": ["--image", str(tmp_path / "x.png")],
             "circuits": []}[args[1]]
    result = runner.invoke(app, [args[1], *extra, "--runtime", "nnsight", "--out", str(tmp_path / "o")]
                           if args[1] != "fix" else [args[1], *extra, "--runtime", "nnsight"])
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "--runtime nnsight" in result.output and "runs with local only" in result.output


@dataclass
class ToyConfig:
    """A made-up analysis: the mean first-token logit over the prompts, scaled."""

    scale: float = field(default=1.0, metadata={"help": "multiply the mean by this"})
    max_tokens: int = 16
    label: str = "toy"
    flag: bool = False

    def check(self) -> None:
        if self.scale <= 0:
            raise InputError(f"--scale must be positive, got {self.scale}")


def toy_run(loaded, prompts, config: ToyConfig, progress: bool = False) -> Result:
    import torch

    from headlab.batching import encode

    with torch.no_grad():
        means = [float(loaded.model(torch.tensor([encode(loaded, p, config.max_tokens)])).logits[0, 0].mean())
                 for p in prompts]
    value = config.scale * sum(means) / len(means)
    return Result("toy", loaded.name, {"scale": config.scale, "label": config.label, "flag": config.flag},
                  summary={"value": value}, report=f"# toy\n\nvalue {value:.6f}\n")


def test_a_registered_analysis_gets_a_generic_command(tmp_path):
    toy = registry.Analysis("toy", "Toy", f"{__name__}:toy_run", f"{__name__}:ToyConfig", command="toy")
    app = typer.Typer()
    app.command("toy")(generic_command(toy))
    app.command("other")(lambda: None)  # a group of two, so that the command is named on the line
    help_text = " ".join(runner.invoke(app, ["toy", "--help"], terminal_width=200).output.split())
    assert "--scale" in help_text and "multiply the mean by this" in help_text and "--kernel" in help_text
    result = runner.invoke(app, ["toy", "--model", "tiny-llama", "--n-prompts", "2", "--scale", "2", "--label", "x",
                                 "--flag", "--out", str(tmp_path), "--name", "t", "--quiet"])
    assert result.exit_code == 0, result.output
    run = Result.load(tmp_path / "t")
    assert run.config == {"scale": 2.0, "label": "x", "flag": True} and "value" in result.output
    loaded = headlab.load("tiny-llama", device="cpu")
    expected = toy_run(loaded, run.prompts, ToyConfig(scale=2.0)).summary["value"]
    assert run.summary["value"] == pytest.approx(expected, rel=1e-6)
    bad = runner.invoke(app, ["toy", "--model", "tiny-llama", "--scale", "-1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--scale must be positive" in bad.output


def test_registry_refuses_a_second_analysis_of_one_name():
    with pytest.raises(headlab.HeadlabError, match="registered already"):
        registry.register_analysis(registry.Analysis("sinks", "Other", "x:y"))
    with pytest.raises(headlab.HeadlabError, match="belongs to analysis"):
        registry.register_analysis(registry.Analysis("sinks2", "Other", "x:y", command="sinks"))


def test_every_registered_analysis_resolves():
    for analysis in registry.ANALYSES.values():
        assert callable(analysis.load("run"))
        if analysis.view is not None:
            analysis.load("view")
    assert json.dumps(sorted(registry.ANALYSES))  # plain names
