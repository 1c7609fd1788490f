"""``edge-sr models``: the named checkpoints and where each resolves on this machine."""

from __future__ import annotations

import click

from edge_sr.cli.options import logging_options


def models_table() -> list[dict]:
    """One row per registry entry; ``location`` is a local path or None (never downloads)."""
    from edge_sr.checkpoints import find_local, list_checkpoints, offline

    rows = []
    for e in list_checkpoints():
        path = find_local(e)
        rows.append(dict(name=e.name, arch=e.arch, scale=e.scale,
                         location=str(path) if path else None,
                         downloadable=e.url is not None and not offline()))
    return rows


@click.command("models")
@logging_options
def models_cmd() -> None:
    """List the named checkpoints (use a name wherever --model is accepted)."""
    rows = models_table()
    width = max(len(r["name"]) for r in rows)
    arch_w = max(len(r["arch"]) for r in rows)
    for r in rows:
        where = r["location"] or ("not here: downloaded on first use where the network allows, "
                                  "or put the file in $EDGE_SR_MODELS" if r["downloadable"]
                                  else "not available")
        click.echo(f"{r['name']:<{width}}  {r['arch']:<{arch_w}}  x{r['scale']}  {where}")
