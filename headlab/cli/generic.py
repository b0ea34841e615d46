"""``analyze <name>`` for a registered analysis that has no hand-written command.

The options are the analysis config's fields with simple types (int, float, str, bool) and a default, named
as the fields (``max_tokens`` -> ``--max-tokens``, help from ``field(metadata={"help": ...})``), plus the
prompts (when the analysis takes prompts), the runs folder, the run name and the model options.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path

import typer

from headlab.cli import options
from headlab.cli.model_args import ModelArgs, takes_model
from headlab.cli.output import say
from headlab.cli.skeleton import Prepared, read_prompt_set, run_and_save, runs_folder_target

SIMPLE = (int, float, str, bool)
DEFAULT_MODEL = "smollm2-135m"


def config_options(config_cls: type) -> list[tuple[str, type, object]]:
    """``(field, type, default)`` of every config field the command line can set."""
    hints = typing.get_type_hints(config_cls)
    found = []
    for f in dataclasses.fields(config_cls):
        kind = hints.get(f.name)
        if f.init and kind in SIMPLE and f.default is not dataclasses.MISSING:
            found.append((f.name, kind, f.default))
    return found


def generic_command(analysis) -> Callable:
    """A typer command running ``analysis`` (an ``analyses.registry.Analysis``) through the one skeleton."""
    config_cls = analysis.load("config")
    fields = config_options(config_cls)
    helps = {f.name: f.metadata.get("help", f.name.replace("_", " ")) for f in dataclasses.fields(config_cls)}
    common = [
        ("out", Path, options.RUNS_FOLDER),
        ("name", str, options.run_name(analysis.name)),
        ("quiet", bool, options.QUIET),
    ]
    if analysis.takes == "prompts":
        common = [("prompts", str, options.PROMPTS), ("n_prompts", int, options.N_PROMPTS), *common]
    own = [(name, kind, typer.Option(default, help=helps[name])) for name, kind, default in fields] + common
    field_names = [name for name, _, _ in fields]

    def command(*, model_args: ModelArgs, **values) -> None:
        quiet = values["quiet"]

        def prepare(args: ModelArgs) -> Prepared:
            config = config_cls(**{name: values[name] for name in field_names})
            if hasattr(config, "check"):
                config.check()
            target = runs_folder_target(analysis.name, args.model, values["out"], values["name"])
            if analysis.takes != "prompts":
                return Prepared(*target, extra=config)
            texts, source = read_prompt_set(args.model, values["prompts"], values["n_prompts"])
            return Prepared(*target, texts=texts, source=source, extra=config)

        def run(loaded, prepared: Prepared):
            function = analysis.load("run")
            if prepared.texts is None:
                return function(loaded, prepared.extra, progress=not quiet)
            return function(loaded, prepared.texts, prepared.extra, progress=not quiet)

        run_and_save(model_args, command=f"analyze {analysis.command}", prepare=prepare, run=run, quiet=quiet,
                     show=lambda result, path: say(result.report), advice="lower the batch size or the token count")

    command.__name__ = analysis.command.replace("-", "_")
    command.__doc__ = f"{analysis.title} (generic command: the options are the config's fields)."
    command.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
         for name, kind, option in own]
        + [inspect.Parameter("model_args", inspect.Parameter.KEYWORD_ONLY, annotation=ModelArgs)])
    command.__annotations__ = {name: kind for name, kind, _ in own}
    return takes_model(DEFAULT_MODEL)(command)
