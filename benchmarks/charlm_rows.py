"""The char-level harness's table: its rows, the training regime, and what a row costs in FLOPs.

A *row* is a tying setting trained at a unique-layer budget ``u`` (``--budget``): how many layers the model
builds, how many steps it trains (a multiple of ``--steps``) and the ``DynTieTrainingArguments`` it passes
(``"u"``, ``"8/u"`` and ``"u+1"`` are replaced by the budget). ``final_map:<row>`` rows retrain the final
map ``<row>`` reached for the same seed as a static map. ``--set`` overrides join every row of a run.
"""

from __future__ import annotations

import json
from typing import Any

POSITIONS = 8  # the full model depth every tied row runs
U = "u"  # placeholder in ROWS, replaced by --budget
FINAL_MAP = "final_map:"
STATIC_U_ROWS = ("sequence_u", "cycle_u", "cycle_rev_u")
BASELINE = "untied8"

# name -> layers built, steps multiplier, DynTieTrainingArguments overrides ("u" / "8/u" / "u+1" are substituted).
ROWS: dict[str, dict[str, Any]] = {
    "untied8": {"layers": POSITIONS, "steps_mult": 1, "tie": {"tie_policy": "untied"}},
    "untied_u": {"layers": U, "steps_mult": 1, "tie": {"tie_policy": "untied"}},
    "untied_u_walltime": {"layers": U, "steps_mult": "8/u", "tie": {"tie_policy": "untied"}},
    "sequence_u": {"layers": POSITIONS, "steps_mult": 1,
                   "tie": {"tie_policy": "sequence", "tie_unique_layers": U, "tie_mode": "share"}},
    # one more unique layer than the budget: what relaxed ties (--set tie_lora_rank=r) are measured against
    "sequence_u_plus1": {"layers": POSITIONS, "steps_mult": 1,
                         "tie": {"tie_policy": "sequence", "tie_unique_layers": "u+1", "tie_mode": "share"}},
    "cycle_u": {"layers": POSITIONS, "steps_mult": 1,
                "tie": {"tie_policy": "cycle", "tie_unique_layers": U, "tie_mode": "share"}},
    "cycle_rev_u": {"layers": POSITIONS, "steps_mult": 1,
                    "tie": {"tie_policy": "cycle_rev", "tie_unique_layers": U, "tie_mode": "share"}},
    "grow_sequence": {"layers": POSITIONS, "steps_mult": 1,
                      "tie": {"tie_policy": "grow", "tie_budget": U, "tie_grow_order": "sequence",
                              "tie_init": "all_tied", "tie_mode": "share"}},
    # grow towards the cycle pattern (each new root takes positions p, p+u, ...): grow ending on static cycle_u
    "grow_spread": {"layers": POSITIONS, "steps_mult": 1,
                    "tie": {"tie_policy": "grow", "tie_budget": U, "tie_grow_order": "spread",
                            "tie_init": "all_tied", "tie_mode": "share"}},
    "grow_scored": {"layers": POSITIONS, "steps_mult": 1,
                    "tie": {"tie_policy": "grow", "tie_budget": U, "tie_grow_order": "scored",
                            "tie_init": "all_tied", "tie_mode": "share"}},
    "greedy": {"layers": POSITIONS, "steps_mult": 1,
               "tie": {"tie_policy": "greedy", "tie_budget": U, "tie_init": "all_tied", "tie_mode": "share"}},
    "random_u": {"layers": POSITIONS, "steps_mult": 1,
                 "tie": {"tie_policy": "random", "tie_budget": U, "tie_init": "all_tied", "tie_interval": 4,
                         "tie_mode": "share"}},
    "dlt_parity": {"layers": POSITIONS, "steps_mult": 1,
                   "tie": {"tie_policy": "qlearning", "tie_reward": "neg_ppl_clipped", "tie_init": "all_tied",
                           "tie_epsilon_decay": 0.95, "tie_interval": 4, "tie_mode": "follow"}},
    "dlt_improved": {"layers": POSITIONS, "steps_mult": 1,
                     "tie": {"tie_policy": "qlearning", "tie_reward": "neg_loss", "tie_init": "all_tied",
                             "tie_replay_size": 64, "tie_replay_batch": 16, "tie_target_update": 8,
                             "tie_bootstrap": "next_layer", "tie_interval": 4, "tie_mode": "share"}},
    # the Q-learning agent with the controller issue's changes: paired held-out reward, gamma 0.5, one-hot
    # roots + progress as state, a decision every 32 steps (4-step rewards see only the transient), budget u
    "dlt_paired": {"layers": POSITIONS, "steps_mult": 1,
                   "tie": {"tie_policy": "qlearning", "tie_reward": "paired", "tie_q_state": "onehot_progress",
                           "tie_gamma": 0.5, "tie_init": "all_tied", "tie_budget": U, "tie_replay_size": 64,
                           "tie_replay_batch": 16, "tie_target_update": 8, "tie_bootstrap": "next_layer",
                           "tie_interval": 32, "tie_mode": "share"}},
}

# The regime, and the --quick one (tiny everything: the test runs in seconds).
REGIME = {"seq_len": 128, "embd": 64, "heads": 4, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.01,
          "betas": (0.9, 0.95), "max_grad_norm": 1.0, "warmup_frac": 0.05, "val_blocks": 256, "test_blocks": 256,
          "eval_batch_size": 64, "train_frac": 0.9}
QUICK = {**REGIME, "seq_len": 32, "embd": 16, "heads": 2, "batch_size": 4, "val_blocks": 8, "test_blocks": 8,
         "eval_batch_size": 8}
QUICK_STEPS, QUICK_EVAL_EVERY = 12, 4


def substitute(value: Any, budget: int) -> Any:
    """A row spec's value with the budget placeholders ``u``, ``8/u`` and ``u+1`` replaced."""
    if value == U:
        return budget
    if value == "8/u":
        return POSITIONS / budget
    if value == "u+1":
        return budget + 1
    return value


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set key=value``: the value as JSON when it parses (numbers, true/false, null), else a string."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"charlm: --set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def check_row_name(name: str) -> None:
    """Fail fast, in one line, on a row the table does not hold (before any data or model is loaded)."""
    if name.startswith(FINAL_MAP):
        if not name[len(FINAL_MAP):]:
            raise SystemExit(f"charlm: {name!r} needs a source row, e.g. final_map:dlt_parity")
        return
    if name not in ROWS:
        raise SystemExit(f"charlm: unknown row {name!r} (known: {', '.join(ROWS)}, final_map:<row>)")


def resolve_row(name: str, budget: int, base_steps: int, sets: dict[str, Any]) -> dict[str, Any]:
    """Layers, steps and DynTieTrainingArguments overrides of a row (final_map rows get their map later)."""
    if name.startswith(FINAL_MAP):
        tie = {"tie_policy": "replay", "tie_mode": "share"}
        layers, mult = POSITIONS, 1
    else:
        spec = ROWS[name]
        tie = {k: substitute(v, budget) for k, v in spec["tie"].items()}
        layers, mult = substitute(spec["layers"], budget), substitute(spec["steps_mult"], budget)
    tie.update(sets)
    return {"layers": int(layers), "steps": int(round(base_steps * mult)), "tie": tie}


def flops_per_step(positions: int, d: int, seq: int, vocab: int, relaxed: float = 0.0, rank: int = 0,
                   weights: int | None = None, delta: int | None = None) -> float:
    """Analytic training FLOPs per token (the per-step factor batch x seq cancels in every ratio):

        F(P) = 3 * [ P * (2 W + 4 T d) + 2 d V + R * 2 r D ]

    P = positions run (8 for every tied row: tying saves parameters, not compute), W = a layer's linear weights
    (GPT-2, the default: 12 d^2 = attention's qkv 3 d^2 and proj d^2 and the MLP's 8 d^2, so 2 W = 24 d^2;
    Llama: 4 d^2 + 3 d I, see ``charlm_family.flops_shape``), 4 T d = QK^T and AV over T = seq positions
    (full, no causal halving), 2 d V = the LM head; x3 = forward + backward (follow mode's skipped weight
    gradients of tied positions are not subtracted). Norms, softmax, the activation and the embedding lookups
    are ignored. Relaxed ties (``tie_lora_rank`` r) add, at each of the ``relaxed`` (mean) tied positions, the
    delta's 2 r (in + out) FLOPs per token on every linear map: 2 r D, with D = the sum of (in + out) over the
    maps (GPT-2's four: 16 d, so 32 r d; Llama's seven: 11 d + 3 I)."""
    weights = 12 * d * d if weights is None else weights
    delta = 16 * d if delta is None else delta
    return 3.0 * (positions * (2 * weights + 4 * seq * d) + 2 * d * vocab + relaxed * 2 * rank * delta)


def row_rank(name: str) -> int:
    """ROWS order (a tagged variant right after its base row), final_map rows last."""
    if name.startswith(FINAL_MAP):
        return len(ROWS)
    bases = [i for i, r in enumerate(ROWS) if name == r or name.startswith(r + "_")]
    return max(bases) if bases else len(ROWS)

