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
                         downloadable=e.url is not None and not offline(),
                         filename=e.filename, shared=e.shared_relpath))
    return rows


def _missing(r: dict) -> str:
    """Where a missing checkpoint would be found, in words a user can act on."""
    from edge_sr.paths import data_root

    places = "put " + r["filename"] + " in $EDGE_SR_MODELS"
    if r["shared"]:
        root = data_root(required=False)
        places += (f", or set EDGE_SR_DATA to the data folder (none found) holding {r['shared']}"
                   if root is None else f" (it is not at {root / r['shared']} either)")
    if r["downloadable"]:
        return "not here: downloaded on first use where the network allows; or " + places
    return "not here: " + places


@click.command("models")
@logging_options
def models_cmd() -> None:
    """List the named checkpoints (use a name wherever --model is accepted)."""
    rows = models_table()
    width = max(len(r["name"]) for r in rows)
    arch_w = max(len(r["arch"]) for r in rows)
    for r in rows:
        where = r["location"] or _missing(r)
        click.echo(f"{r['name']:<{width}}  {r['arch']:<{arch_w}}  x{r['scale']}  {where}")
