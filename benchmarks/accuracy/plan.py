"""The accuracy bench's plan: the methods and published tables it compares with, the model
families, where each (scale, bits, method, set) cell lives, and which cells a run makes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METHODS = ("minmax", "percentile", "dobi", "2dquant")
# Variant, run only when asked (--methods): 2DQuant with one shared input quantizer for the fused
# qkv linear (what an engine runs) instead of the paper's three. DOBI gives all three the same
# bounds (they see one tensor), so the two differ only after DQC.
SHARED = "2dquant-shared"
# Variant beyond the paper (--methods): 2DQuant with fc1's input quantizer at 8 bits
# (QuantRecipe.wide_inputs), for post-norm NGswin whose fc1 input is the raw residual stream.
WIDE = "2dquant-a8fc1"
# The paper recipe (4000 iterations, batch 16, 64x64 LR patches): run where a GPU was lent.
PAPER_RECIPE = "2dquant-paper"
# The paper recipe stopped early (a GPU lease ran out): made by scripts/calib_from_dqc_state.py
# from the run's state file, never by this bench.
PAPER_CUT = "2dquant-paper-cut"
ORDER = ("fp", *METHODS, PAPER_RECIPE, PAPER_CUT, SHARED, WIDE)
LABEL = {"fp": "FP", "minmax": "MinMax", "percentile": "Percentile", "dobi": "DOBI",
         "2dquant": "2DQuant (fast)", PAPER_RECIPE: "2DQuant (paper recipe)",
         PAPER_CUT: "2DQuant (paper recipe, cut short)",
         SHARED: "2DQuant (fast), shared qkv input", WIDE: "2DQuant (fast), fc1 input 8-bit"}
DQC_METHODS = ("2dquant", PAPER_RECIPE, SHARED, WIDE)

# Paper Table 3 PSNR (spec §6): {scale: {(method, bits): (Set5, Set14, B100, Urban100)}}.
PAPER = {
    2: {("fp", 32): (38.15, 33.86, 32.31, 32.76),
        ("minmax", 4): (34.39, 30.55, 29.72, 28.40), ("percentile", 4): (37.37, 32.96, 31.61, 31.17),
        ("dobi", 4): (37.44, 33.15, 31.75, 31.29), ("2dquant", 4): (37.87, 33.41, 32.02, 31.84),
        ("minmax", 3): (28.19, 26.40, 25.83, 25.19), ("percentile", 3): (34.37, 31.04, 29.82, 28.25),
        ("dobi", 3): (36.37, 32.33, 31.12, 29.65), ("2dquant", 3): (37.32, 32.85, 31.60, 30.45),
        ("minmax", 2): (33.88, 30.81, 29.99, 27.48), ("percentile", 2): (30.82, 28.80, 27.95, 26.30),
        ("dobi", 2): (35.25, 31.72, 30.62, 28.52), ("2dquant", 2): (36.00, 31.98, 30.91, 28.62)},
    3: {("fp", 32): (34.63, 30.54, 29.20, 28.66),
        ("minmax", 4): (31.66, 28.17, 27.19, 25.60), ("percentile", 4): (33.34, 29.61, 28.49, 27.06),
        ("dobi", 4): (33.78, 29.87, 28.72, 27.53), ("2dquant", 4): (34.06, 30.12, 28.89, 27.69),
        ("minmax", 3): (26.01, 23.41, 22.46, 21.70), ("percentile", 3): (30.91, 28.02, 27.23, 25.32),
        ("dobi", 3): (32.85, 29.33, 28.27, 26.36), ("2dquant", 3): (33.24, 29.56, 28.50, 26.65),
        ("minmax", 2): (26.05, 24.74, 24.42, 22.87), ("percentile", 2): (25.30, 23.60, 23.77, 22.33),
        ("dobi", 2): (30.54, 27.74, 26.69, 24.80), ("2dquant", 2): (31.62, 28.54, 27.85, 25.30)},
    4: {("fp", 32): (32.45, 28.77, 27.69, 26.48),
        ("minmax", 4): (28.63, 25.73, 25.10, 23.07), ("percentile", 4): (30.64, 27.61, 26.96, 24.96),
        ("dobi", 4): (31.10, 28.03, 27.18, 25.43), ("2dquant", 4): (31.77, 28.30, 27.37, 25.71),
        ("minmax", 3): (19.41, 18.35, 18.79, 17.88), ("percentile", 3): (27.55, 25.15, 24.45, 22.80),
        ("dobi", 3): (29.59, 26.87, 26.24, 24.17), ("2dquant", 3): (30.90, 27.75, 26.99, 24.85),
        ("minmax", 2): (23.96, 22.92, 22.70, 21.16), ("percentile", 2): (23.03, 22.12, 21.83, 20.45),
        ("dobi", 2): (28.82, 26.46, 25.97, 23.67), ("2dquant", 2): (29.53, 26.86, 26.46, 23.84)},
}
SETS = ("Set5", "Set14", "B100", "Urban100")

# CondiQuant (arXiv 2502.15478) on SwinIR-light, docs/anchors.md: {scale: {bits: (Set5, Set14,
# B100, Urban100)}}; its FP row is Table 3's.
CONDIQUANT = {
    2: {4: (38.03, 33.50, 32.16, 32.03), 3: (37.77, 33.21, 31.94, 31.18),
        2: (37.15, 32.74, 31.55, 29.96)},
    3: {4: (34.32, 30.29, 29.05, 28.05), 3: (33.92, 30.02, 28.84, 27.37),
        2: (33.00, 29.44, 28.45, 26.36)},
    4: {4: (32.09, 28.50, 27.52, 25.97), 3: (31.62, 28.20, 27.31, 25.39),
        2: (30.64, 27.59, 26.93, 24.54)},
}


@dataclass(frozen=True)
class Family:
    """Which checkpoints a bench run quantizes and where its cells and table go."""

    key: str
    checkpoint: str  # registry name with ``{scale}``
    title: str
    out: Path
    doc: Path
    scales: tuple[int, ...]
    wide_scales: tuple[int, ...]  # scales that get the B100/Urban100 rows (4 and 2 bits)
    condiquant: bool  # add CondiQuant's published drop beside ours


FAMILIES = {
    "swinir": Family("swinir", "swinir-light-x{scale}-ref", "reference SwinIR-light",
                     Path("results/accuracy"), Path("docs/results/accuracy.md"), (2, 4, 3), (4,),
                     False),
    "ngswin": Family("ngswin", "ngswin-x{scale}", "NGswin (official)",
                     Path("results/accuracy_ngswin"), Path("docs/results/ngswin_accuracy.md"),
                     (2, 3), (2, 3), True),
}


@dataclass
class Settings:
    """What this process runs: set once by ``__main__.main`` (tests patch it)."""

    family: Family
    device: str = "cpu"
    # this run's cells (its --scales/--bits/--datasets/--methods) and its command line: the
    # table's "Not run yet" lists this plan's missing cells, and "Generated by" this command
    # (None: the family's whole default plan and its plain command)
    cells: list[tuple[int, int, str, str]] | None = None
    command: str | None = None


SETTINGS = Settings(FAMILIES["swinir"])




def cell_path(scale: int, bits: int, method: str, dataset: str) -> Path:
    return SETTINGS.family.out / f"x{scale}_w{bits}_{method}_{dataset}.json"


def calib_path(scale: int, bits: int, method: str) -> Path:
    return SETTINGS.family.out / "calib" / f"x{scale}_w{bits}_{method}.pt"


def parts_dir(cell: Path) -> Path:
    """Where a cell keeps one JSON per scored image until it is folded into the cell."""
    return cell.with_name(cell.stem + ".parts")


def plan(scales: list[int], bits_list: list[int], datasets: tuple[str, ...] = SETS,
         methods: tuple[str, ...] = METHODS) -> list[tuple[int, int, str, str]]:
    cells = []
    for s in scales:
        for ds in ("Set5", "Set14"):
            cells.append((s, 32, "fp", ds))
            cells += [(s, b, m, ds) for b in bits_list for m in methods]
    for ds in ("B100", "Urban100"):
        for s in (s for s in scales if s in SETTINGS.family.wide_scales):
            cells.append((s, 32, "fp", ds))
            cells += [(s, b, m, ds) for b in (4, 2) if b in bits_list for m in methods]
    return [c for c in cells if c[3] in datasets]
