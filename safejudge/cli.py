"""`safejudge` command line: thin commands over the library. Errors: one readable line, exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from safejudge.constitution import ConstitutionError, load_constitution

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Judge images against a safety constitution.")
constitution_app = typer.Typer(no_args_is_help=True, help="Validate, lint and author constitutions.")
build_app = typer.Typer(no_args_is_help=True, help="Offline builds: compiled constitutions, encoders, engines.")
app.add_typer(constitution_app, name="constitution")
app.add_typer(build_app, name="build")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one readable error line (several for multi-problem files) and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@constitution_app.command("check")
def constitution_check(files: list[Path] = typer.Argument(..., help="constitution YAML files")) -> None:
    """Validate constitution files; exit 2 with file:line messages if any is invalid."""
    failed = False
    for path in files:
        try:
            constitution = load_constitution(path)
        except ConstitutionError as exc:
            typer.echo(str(exc), err=True)
            failed = True
            continue
        rules = constitution.rules
        chains = sum(len(rule.preconditions) for rule in rules)
        typer.echo(f"{path}: ok ({constitution.name} v{constitution.version}: {len(rules)} rules, {chains} precondition items)")
    if failed:
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
