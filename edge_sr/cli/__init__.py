"""The ``edge-sr`` command line: a thin shell over the Python API.

Each command lives in its own module (``edge_sr/cli/<name>_cmd.py``) and is imported only when it
is invoked, so ``edge-sr --help`` stays fast and never touches torch, onnxruntime or tensorrt.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from edge_sr.allocator import keep_freed_memory
from edge_sr.errors import EdgeSRError, Terminated, sigterm_as_interrupt
from edge_sr.logutil import setup_logging

COMMANDS = {
    "eval": "edge_sr.cli.eval_cmd:eval_cmd",
    "calibrate": "edge_sr.cli.calibrate_cmd:calibrate_cmd",
    "export": "edge_sr.cli.export_cmd:export_cmd",
    "build": "edge_sr.cli.build_cmd:build_cmd",
    "upscale": "edge_sr.cli.upscale_cmd:upscale_cmd",
    "profile": "edge_sr.cli.profile_cmd:profile_cmd",
    "models": "edge_sr.cli.models_cmd:models_cmd",
}


def interrupted_message(e: KeyboardInterrupt) -> str:
    """The one line printed when a command is interrupted (Ctrl-C or SIGTERM)."""
    how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    hint = getattr(e, "hint", "")
    return f"edge-sr: {how}; nothing half-written was kept" + (f"; {hint}" if hint else "")


OS_ERROR_EXIT = 1  # a file the system would not read or write (EdgeSRError's bad input is 2)


def os_error_message(e: OSError) -> str:
    """One line for an OSError that no check caught first: what failed, on which path(s)."""
    what = e.strerror or type(e).__name__
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{paths}: {what}" if paths else f"{what} ({e})"


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except click.UsageError as e:  # a bad option or value: one line, as for EdgeSRError
            sub = e.ctx.command_path if e.ctx is not None else "edge-sr"
            click.echo(f"{sub}: error: {e.format_message()} (see '{sub} --help')", err=True)
            ctx.exit(e.exit_code)
        except (EdgeSRError, OSError) as e:
            if ctx.obj and ctx.obj.get("verbose"):
                logging.getLogger("edge_sr").exception("error")
            # named as click names a usage error: "edge-sr build: error: ..."
            sub = " ".join(("edge-sr", *filter(None, [ctx.invoked_subcommand])))
            click.echo(f"{sub}: error: {os_error_message(e) if isinstance(e, OSError) else e}",
                       err=True)
            ctx.exit(getattr(e, "exit_code", OS_ERROR_EXIT))
        except KeyboardInterrupt as e:
            click.echo(interrupted_message(e), err=True)
            ctx.exit(getattr(e, "exit_code", 130))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and tracebacks on errors.")
@click.version_option(package_name="edge-sr")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """edge-sr: 2DQuant low-bit super-resolution for edge devices."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    setup_logging(quiet=quiet, verbose=verbose)
    keep_freed_memory()


def run() -> None:  # pragma: no cover - console entry for `python -m edge_sr`
    sys.exit(main())
