"""The compression harness's table: its rows, the regime's step counts, and the relaxed-delta rank of a row.

Every row of a stage ends with ``u`` unique layers (``--budgets``), except the teacher itself. Rows that start
from the teacher ("derived" rows) are uptrained for ``U`` steps on the windows that follow the teacher's ``P``
in the seed's data stream; the from-scratch baselines train ``P + U`` steps on that whole stream from the
seed's initial weights, so both see exactly the same data.

Kinds: ``teacher`` (the untied 8-layer model, trained once per seed, its record reused), ``oneshot``
(``from_stock(teacher, sequence map, init, tie_lora_rank, delta_init, tie_lora_vectors)``, then uptrained with
the map held), ``shrink`` (``tie_policy="shrink"`` from the teacher's untied map, merges averaged, SVD deltas
and offsets where the row has a rank), ``scratch`` (random init, ``P + U`` steps) and ``distill`` (an untied u-layer student started
from every (8/u)-th teacher layer, trained ``U`` steps on cross-entropy + KL to the teacher's logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POSITIONS = 8  # the teacher's depth; every tied row runs all 8 positions
TEACHER = "teacher"
SCRATCH_TIED = "scratch_tied"
DERIVED_KINDS = ("oneshot", "shrink", "distill")  # rows that start from the teacher's weights
SHRINK_UNTIL = 0.5  # shrink's last merge at half the uptraining, the library's default
UPTRAIN_FRACTION = 0.2  # U = 20% of P unless --uptrain-steps says

# name -> kind and its settings; "rank": "layer" = the rank whose deltas (and offsets) hold about one layer's
# parameters, "full" = the full rank (identity check). Relaxed rows carry vector offsets (tie_lora_vectors).
ROWS: dict[str, dict[str, Any]] = {
    TEACHER: {"kind": "teacher"},
    "oneshot_root": {"kind": "oneshot", "init": "root"},
    "oneshot_average": {"kind": "oneshot", "init": "average"},
    "oneshot_average_svd": {"kind": "oneshot", "init": "average", "rank": "layer"},
    # the control for average + SVD: a root keeps its own weights, so only the truncation leaves the teacher
    "oneshot_root_svd": {"kind": "oneshot", "init": "root", "rank": "layer"},
    "shrink_sequence": {"kind": "shrink", "order": "sequence"},
    "shrink_sequence_svd": {"kind": "shrink", "order": "sequence", "rank": "layer"},
    "shrink_scored": {"kind": "shrink", "order": "scored"},
    "shrink_scored_svd": {"kind": "shrink", "order": "scored", "rank": "layer"},
    # relaxed roots (tie_lora_roots): each group's root position gets its own delta and offsets too, as every
    # loop of Relaxed Recursive Transformers has its own LoRA; "average" + SVD then starts at the teacher at full
    # rank. All 8 positions carry deltas, so the rank that holds one layer is lower (5 at u = 4 and at u = 2)
    "oneshot_average_svd_roots": {"kind": "oneshot", "init": "average", "rank": "layer", "roots": True},
    "shrink_sequence_svd_roots": {"kind": "shrink", "order": "sequence", "rank": "layer", "roots": True},
    # the uptraining learning rate (every other derived row re-warms to the regime's pretraining peak, 3e-3):
    # does a gentler uptraining keep more of the teacher? Added after the first u = 4 seeds, on the best row;
    # 6e-3 after 1e-3 and 3e-4 lost on seeds 0-1 (the bracket from above)
    "oneshot_root_svd_lr6e-3": {"kind": "oneshot", "init": "root", "rank": "layer", "lr": 6e-3},
    "oneshot_root_svd_lr1e-3": {"kind": "oneshot", "init": "root", "rank": "layer", "lr": 1e-3},
    "oneshot_root_svd_lr3e-4": {"kind": "oneshot", "init": "root", "rank": "layer", "lr": 3e-4},
    # progressive ties done by 10% of the uptraining (the stage's shrink_until is 0.5): is one-shot's edge only
    # that its final map trains longer? Added with the learning-rate rows
    "shrink_sequence_svd_until0.1": {"kind": "shrink", "order": "sequence", "rank": "layer", "until": 0.1},
    SCRATCH_TIED: {"kind": "scratch", "tied": True},
    "scratch_untied_u": {"kind": "scratch", "tied": False},
    "distill_untied_u": {"kind": "distill"},
    # not in the plan: the identity checks of the tests. Full-rank SVD deltas and offsets give every *tied*
    # position its own function back (root: the teacher exactly); with "average" the roots' own positions run
    # their group's mean (a root has no delta).
    "oneshot_root_svd_full": {"kind": "oneshot", "init": "root", "rank": "full"},
    "oneshot_average_svd_full": {"kind": "oneshot", "init": "average", "rank": "full"},
    "oneshot_average_svd_roots_full": {"kind": "oneshot", "init": "average", "rank": "full", "roots": True},
}
PLAN_ROWS = [name for name in ROWS if not name.endswith("_full")]

QUICK_PRETRAIN, QUICK_UPTRAIN, QUICK_EVAL_EVERY = 40, 8, 4


@dataclass
class Row:
    """One row resolved for a stage: what to build, how long to train, which windows, which trainer options."""

    name: str
    kind: str
    layers: int  # layers the model builds (8, or u for the untied shallow rows)
    steps: int  # optimizer steps this row trains (uptraining only, for derived rows)
    offset_steps: int  # where its windows start in the seed's stream (P for derived rows)
    init: str = "root"
    rank: int = 0
    roots: bool = False  # tie_lora_roots: a group's root position carries its own delta too
    lr: float | None = None  # the peak learning rate, when not the regime's
    tie: dict[str, Any] = field(default_factory=dict)

    @property
    def derived(self) -> bool:
        return self.kind in DERIVED_KINDS

    @property
    def total_steps(self) -> int:
        """Steps of training behind the final model, the teacher's pretraining included."""
        return self.steps + self.offset_steps


def check_row_name(name: str) -> None:
    """Fail fast, in one line, on a row the table does not hold (before any data or model is loaded)."""
    if name not in ROWS:
        raise SystemExit(f"compress: unknown row {name!r} (known: {', '.join(ROWS)})")


def layer_parameters(family: str, regime: dict[str, Any]) -> int:
    """Parameters of one block of ``family`` in the regime's shape (what "one layer's parameters" means)."""
    from charlm_family import family_hparams, gpt2_layer_parameters

    if family == "gpt2":
        return gpt2_layer_parameters(regime["embd"])
    return family_hparams(family, regime)["layer_parameters_llama"]


def delta_rank(spec: str, budget: int, family: str, regime: dict[str, Any], roots: bool = False) -> int:
    """The rank of a row's relaxed deltas. ``"layer"``: the largest rank whose deltas *and vector offsets*
    (relaxed rows use ``tie_lora_vectors``) over the positions that carry them in the final ``sequence`` map
    (the ``8 - u`` tied ones; with ``roots`` also the groups' roots) hold at most one layer's parameters (a GPT-2
    delta costs 16 d per unit of rank and position, its offsets 13 d per position: 11 at u = 4 and 7 at u = 2
    with d = 64, 5 at both with relaxed roots; charlm's relaxed rows, without offsets, used 12 and 8). ``"full"``:
    d, the full rank of every linear map of the block (the SVD then gives each position its own linear maps
    back)."""
    from charlm_family import flops_shape, vector_parameters
    from hf_dyntie.tie_map import relaxed_positions
    from hf_dyntie.training.policies.static import sequence_map

    if spec == "full":
        return int(regime["embd"])
    if budget >= POSITIONS:
        raise SystemExit(f"compress: budget {budget} ties no position; a relaxed row needs u < {POSITIONS}")
    carrying = len(relaxed_positions(sequence_map(POSITIONS, budget), roots))
    per_rank = flops_shape(family, regime)[1]
    offsets = carrying * vector_parameters(family, int(regime["embd"]))
    return max(1, (layer_parameters(family, regime) - offsets) // (carrying * per_rank))


def resolve_row(name: str, budget: int, pretrain: int, uptrain: int, family: str, regime: dict[str, Any],
                shrink_until: float = SHRINK_UNTIL) -> Row:
    """The row ``name`` at budget ``u`` for a teacher of ``pretrain`` steps and ``uptrain`` steps after it."""
    spec = ROWS[name]
    kind = spec["kind"]
    roots = bool(spec.get("roots"))
    rank = delta_rank(spec["rank"], budget, family, regime, roots) if spec.get("rank") else 0
    static_u = {"tie_policy": "sequence", "tie_unique_layers": budget, "tie_mode": "share"}
    if kind == "teacher":
        return Row(name, kind, POSITIONS, pretrain, 0, tie={"tie_policy": "untied"})
    if kind == "oneshot":  # tied before the trainer sees it (from_stock); the static policy holds that map
        return Row(name, kind, POSITIONS, uptrain, pretrain, init=spec["init"], rank=rank, roots=roots,
                   lr=spec.get("lr"), tie=static_u)
    if kind == "shrink":
        tie = {"tie_policy": "shrink", "tie_budget": budget, "tie_shrink_order": spec["order"],
               "tie_shrink_until": spec.get("until", shrink_until), "tie_merge": "average", "tie_interval": 1, "tie_mode": "share"}
        if rank:
            tie.update(tie_lora_rank=rank, tie_lora_init="svd", tie_lora_vectors=True, tie_lora_roots=roots)
        return Row(name, kind, POSITIONS, uptrain, pretrain, init="average", rank=rank, roots=roots, tie=tie)
    if kind == "scratch":
        if spec["tied"]:
            return Row(name, kind, POSITIONS, pretrain + uptrain, 0, tie=static_u)
        return Row(name, kind, budget, pretrain + uptrain, 0, tie={"tie_policy": "untied"})
    if kind == "distill":
        return Row(name, kind, budget, uptrain, pretrain, tie={"tie_policy": "untied"})
    raise ValueError(f"unknown row kind {kind!r}")


def row_order(name: str) -> int:
    """The table's order (ROWS), unknown rows last."""
    names = list(ROWS)
    return names.index(name) if name in names else len(names)
