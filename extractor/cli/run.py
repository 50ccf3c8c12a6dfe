"""`extractor run`: a corpus run. Its options are generated from `RunConfig`'s fields, so the help text, the
defaults and the validation come from one place: each field `top_k` is the option `--top-k`."""

from __future__ import annotations

import inspect
import typing
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo

from extractor.attribution.measures import MEASURES
from extractor.cli.common import fail, user_errors
from extractor.corpus.config import RunConfig, comma_separated, load_config, option_name, parse_set

SHORT = {"model": "-m", "input": "-i", "output": "-o"}


def _value_type(field: FieldInfo) -> type:
    """The option's Python type: the field's, without None (every option defaults to 'not given')."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType) else annotation
    kinds: tuple[type, ...] = (bool, int, float)
    return next((kind for kind in kinds if kind == base), str)


def _help(name: str, field: FieldInfo) -> str:
    text = field.description or name
    choices = [a for a in typing.get_args(field.annotation) if isinstance(a, str)]
    if choices:
        text += f" One of: {', '.join(choices)}."
    if name == "measures":
        text = f"Comma-separated measures to store, from: {', '.join(MEASURES)}."
    default = field.get_default(call_default_factory=True)
    shown = ",".join(default) if isinstance(default, list) else ("none" if default is None else default)
    return f"{text} (default: {shown})"


def config_option(name: str, field: FieldInfo) -> inspect.Parameter:
    """RunConfig field → a keyword-only option that defaults to None (= not given, the config file's value holds)."""
    kind = _value_type(field)
    flag = option_name(name)
    declarations = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag, *([SHORT[name]] if name in SHORT else [])]
    choices = [a for a in typing.get_args(field.annotation) if isinstance(a, str)]
    metavar = "|".join(choices) if choices else {int: "N", float: "X"}.get(kind, "TEXT")
    option = typer.Option(*declarations, help=_help(name, field), show_default=False, metavar=metavar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])  # type: ignore[valid-type]


@user_errors
def run(
    config: str | None = None,
    set_: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    **flags: Any,
) -> None:
    """Extract, verify and store every head's associations over a corpus (streamed, resumable)."""
    from extractor.presentation.extras import FigureHelper

    if isinstance(flags.get("measures"), str):
        flags["measures"] = comma_separated(flags["measures"])
    settings = load_config(config, flags, parse_set(set_ or []))
    # started before torch is imported: its own imports use the CPU that this start-up leaves idle
    helper = FigureHelper.start() if settings.plots and settings.report else None
    try:
        from extractor.api import run_extraction

        manifest = run_extraction(settings, resume=resume, overwrite=overwrite, quiet=quiet, figure_helper=helper)
    finally:
        if helper is not None:
            helper.dismiss()
    if manifest.get("verification", {}).get("passed") is False:
        failing = ", ".join(manifest["verification"]["failing_heads"])
        raise fail(f"verification failed for {failing} (see verification.parquet)", code=1)


_COMMAND_OPTIONS = [
    inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        str | None, typer.Argument(help="YAML run config (see configs/default.yaml).", show_default=False,
                                   metavar="CONFIG")]),
    inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: key=value (repeatable; key=null clears it).",
                                       show_default=False, metavar="KEY=VALUE")]),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--resume", help="Finish an interrupted run in the same output folder.")]),
    inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--overwrite", help="Replace the run in the output folder (only files a run writes are deleted).")]),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress output.")]),
]
_parameters = _COMMAND_OPTIONS + [config_option(name, field) for name, field in RunConfig.model_fields.items()]
run.__signature__ = inspect.Signature(_parameters)  # type: ignore[attr-defined]
run.__annotations__ = {p.name: p.annotation for p in _parameters} | {"return": None}
