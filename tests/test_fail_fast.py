"""A value that needs no model is refused before torch is imported: in about a second, not after a model load.

Each case runs in one subprocess where importing torch raises: a check that came after the import would
show up as that ImportError instead of its own ``error:`` line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CASES = {
    "sinks --batch-size 0": (["sinks", "--batch-size", "0"], "--batch-size must be at least 1"),
    "sinks --n-prompts 0": (["sinks", "--n-prompts", "0"], "--n-prompts must be positive"),
    "sinks --eps 5": (["sinks", "--eps", "5"], "--eps must lie between 0 and 1"),
    "sinks --max-tokens 0": (["sinks", "--max-tokens", "0"], "--max-tokens must be a positive"),
    "sinks lifetime low only": (["sinks", "--lifetime-low", "5"], "give both --lifetime-low and --lifetime-high"),
    "sinks lifetime swapped": (["sinks", "--lifetime-low", "9", "--lifetime-high", "2"],
                               "--lifetime-low and --lifetime-high need 0 <= low < high"),
    "sinks --cos-threshold 2": (["sinks", "--cos-threshold", "2"], "--cos-threshold must lie between 0 and 1"),
    "position-bias --batch-size 0": (["position-bias", "--batch-size", "0"], "--batch-size must be at least 1"),
    "position-bias --n-relative 1": (["position-bias", "--n-relative", "1"], "--n-relative must be at least 3"),
    "position-bias --rollout-tokens 5000": (["position-bias", "--rollout-tokens", "5000"], "--rollout-tokens"),
    "vhd --k 0": (["vhd", "--images", ".", "--prompts", "p.txt", "--k", "0"], "--k must be at least 1"),
    "lofit select --epochs 0": (["lofit", "select", "--data", "d.jsonl", "--epochs", "0"],
                                "--epochs must be at least 1"),
    "circuits colored-objects:99": (["circuits", "--tasks", "colored-objects:99"], "at most 10 shots"),
    "circuits unknown task": (["circuits", "--tasks", "ioi,nope"], "unknown task 'nope'"),
    "lofit train --lr 0": (["lofit", "train", "--data", "d.jsonl", "--heads", "sel", "--lr", "0"],
                           "--lr must be positive"),
}

SCRIPT = textwrap.dedent("""
    import json, sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith(("torch.", "transformers")):
                raise ImportError("torch was imported before the plain checks")
    sys.meta_path.insert(0, NoTorch())
    from typer.testing import CliRunner
    from headlab.cli import analyze_app, headlab_app
    runner = CliRunner()
    out = {}
    for key, args in json.loads(sys.argv[1]).items():
        app = headlab_app if args[0] == "lofit" else analyze_app
        result = runner.invoke(app, args)
        out[key] = [result.exit_code, result.output]
    print(json.dumps(out))
""")


def test_plain_values_are_checked_before_torch_loads(tmp_path):
    args = {key: [*argv, "--out", str(tmp_path / "runs")] for key, (argv, _) in CASES.items()}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for key, (_, message) in CASES.items():
        code, output = results[key]
        assert code == 2 and output.startswith("error:") and message in output, (key, output)
        assert "Traceback" not in output and "torch was imported" not in output, (key, output)
    assert not (tmp_path / "runs").exists()
