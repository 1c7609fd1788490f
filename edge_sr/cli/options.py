"""Options shared by every subcommand."""

from __future__ import annotations

import functools

import click

from edge_sr.logutil import setup_logging


def logging_options(f):
    """Add ``--quiet/--verbose`` to a subcommand (they also exist on the ``edge-sr`` group)."""

    @click.option("-q", "--quiet", "sub_quiet", is_flag=True, help="Only warnings and errors.")
    @click.option("-v", "--verbose", "sub_verbose", is_flag=True,
                  help="Debug logging, and tracebacks on errors.")
    @functools.wraps(f)
    def wrapper(*args, sub_quiet: bool = False, sub_verbose: bool = False, **kwargs):
        ctx = click.get_current_context()
        root = ctx.find_root()
        root.ensure_object(dict)
        if sub_quiet or sub_verbose:
            root.obj["verbose"] = root.obj.get("verbose") or sub_verbose
            setup_logging(quiet=sub_quiet, verbose=root.obj["verbose"])
        return f(*args, **kwargs)

    return wrapper


def parse_size(value: str, option: str) -> tuple[int, int]:
    """Parse ``WxH`` (or a single ``N`` for a square) into (height, width)."""
    from edge_sr.errors import EdgeSRError

    try:
        parts = [int(v) for v in value.lower().split("x")]
        if len(parts) == 1:
            parts = parts * 2
        w, h = parts
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise EdgeSRError(f"{option}: expected WIDTHxHEIGHT like 64x64, got {value!r}") from None
    return h, w


def parse_list(text: str) -> tuple[str, ...]:
    """``"fc1, qkv"`` -> ``("fc1", "qkv")``; empty items are dropped (validation is the API's)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_rotate(text: str | None) -> tuple[str, ...] | None:
    """``--rotate``: None (the method's default), ``none`` (off), or a list of roles/paths."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return parse_list(text)
