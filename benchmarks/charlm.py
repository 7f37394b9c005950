"""Char-level Tiny Shakespeare evidence harness: tying rows at a fixed unique-layer budget, paired seeds.

The regime of tying-agent-diagnosis.md (sections 3.3, 3.4, 6): GPT-2 blocks (8 positions x d 64, 4 heads,
dropout off), seq 128, batch 16, character vocabulary (65), AdamW (0.9, 0.95), weight decay 0.01, lr 3e-3
cosine with 5% warm-up, grad clip 1.0, 90/10 train/held-out split. The held-out 10% holds a fixed
*validation* slice (its first 256 non-overlapping 128-char blocks: curves, final score, and whatever a
policy scores maps on) and a fixed *test* slice (its last 256 blocks), evaluated once at the end of each
cell. Nothing is chosen on test.

One *cell* = one (row, seed). Every cell of one seed is paired with the others:

- data: ``max_steps * batch`` random 128-char training windows, offsets drawn from
  ``torch.Generator().manual_seed(seed)`` and fed in that order (sequential sampler), identical across rows;
- init: ``torch.manual_seed(seed)`` right before the model is built, so every 8-position row of one seed
  starts from the same weights (the tie map is applied afterwards by the trainer).

Cells are appended (one JSON line each, flushed) to ``charlm_<stage>_u<budget>_cells.jsonl`` as they finish;
a restart skips the cells already there, so a killed run loses at most the cell in progress. The summary
(``charlm_<stage>_u<budget>.json`` / ``.md`` and plots) is rebuilt from that file after every cell and by
``--summarize-only``: mean +- 95% Student-t CI per row and *paired* (same-seed) differences to ``untied8`` and
to the best static-u row.

    python benchmarks/charlm.py --stage spread --rows untied8,untied_u --seeds 0,1,2,3,4 --steps 1200
    python benchmarks/charlm.py --stage screen --rows greedy --set tie_interval=64 --tag i64 --seeds 0,1
    python benchmarks/charlm.py --stage screen --rows dlt_parity,final_map:dlt_parity --seeds 0,1
    python benchmarks/charlm.py --stage screen --summarize-only
    python benchmarks/charlm.py --quick --output /tmp/c --rows untied8,sequence_u --seeds 0,1   # seconds
    python benchmarks/charlm.py --snr-probe          # action-effect SNR probe (diag/action_snr.py, this regime)

Rows (``ROWS``; ``u`` = ``--budget``): untied8, untied_u, untied_u_walltime (steps x 8/u), sequence_u,
sequence_u_plus1 (u + 1 unique layers: the row relaxed ties, ``--set tie_lora_rank=r``, are measured against), cycle_u,
cycle_rev_u, grow_sequence, grow_scored, greedy, random_u, dlt_parity, dlt_improved, dlt_paired, and
``final_map:<row>`` (the final map ``<row>`` reached for the same seed, retrained from scratch as a static
map; share mode unless ``--set tie_mode=follow``). ``--set key=value`` adds tie_*/trainer overrides to every
row of the invocation and ``--tag`` suffixes their names (``greedy_i64``), so variants live side by side.

Run with ``OMP_NUM_THREADS=1`` and ``--threads 1`` on a shared CPU. Run folders are scratch, under
``/tmp/charlm_runs``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUTPUT, gpt2_config_kwargs, machine_info, md_table, set_threads, shared_path, write_results  # noqa: E402

DATA_FILE = "data/tinyshakespeare/input.txt"
RUNS_ROOT = Path("/tmp/charlm_runs")
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

# Student t, 97.5% quantile, dof 1..30 (used when scipy is not installed).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class HarnessError(Exception):
    """A cell that cannot run (missing option, missing source map): one line, the other cells go on."""


# ---------------------------------------------------------------------------------------------- statistics


def t_quantile(dof: int) -> float:
    """97.5% quantile of Student's t with ``dof`` degrees of freedom (scipy if installed, else the table;
    beyond 30 dof the Cornish-Fisher expansion z + (z^3 + z) / (4 dof))."""
    if dof < 1:
        raise ValueError("a t quantile needs at least 1 degree of freedom")
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, dof))
    except ImportError:
        pass
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof)


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean, sample sd and the 95% t-CI half-width (n-1 dof). One value: no sd, no CI (never faked)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None, "lo": None, "hi": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None, "lo": None, "hi": None, "note": "1 seed: no CI"}
    sd = statistics.stdev(values)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": half, "lo": mean - half, "hi": mean + half}


def paired(cells_a: dict[int, dict], cells_b: dict[int, dict], key: str) -> dict[str, Any] | None:
    """Mean and t-CI of a[key] - b[key] over the seeds both rows have; ``real`` only if the CI excludes 0."""
    seeds = sorted(set(cells_a) & set(cells_b))
    if not seeds:
        return None
    stats = mean_ci([cells_a[s][key] - cells_b[s][key] for s in seeds])
    stats["seeds"] = seeds
    stats["real"] = bool(stats["ci95"] is not None and (stats["lo"] > 0 or stats["hi"] < 0))
    return stats


# ---------------------------------------------------------------------------------------------- rows


def substitute(value: Any, budget: int) -> Any:
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


def flops_per_step(positions: int, d: int, seq: int, vocab: int, relaxed: float = 0.0, rank: int = 0) -> float:
    """Analytic training FLOPs per token (the per-step factor batch x seq cancels in every ratio):

        F(P) = 3 * [ P * (24 d^2 + 4 T d) + 2 d V + R * 32 r d ]

    P = positions run (8 for every tied row: tying saves parameters, not compute), 24 d^2 = 2 FLOPs x the
    12 d^2 weights of attention (qkv 3d^2, proj d^2) and MLP (8 d^2), 4 T d = QK^T and AV over T = seq
    positions (full, no causal halving), 2 d V = the LM head; x3 = forward + backward (follow mode's
    skipped weight gradients of tied positions are not subtracted). Layer norms, softmax, GELU and the
    embedding lookups are ignored. Relaxed ties (``tie_lora_rank`` r) add, at each of the ``relaxed`` (mean)
    tied positions, the delta's 2 r (in + out) FLOPs per token on its four linear maps: 2 r x 16 d = 32 r d."""
    return 3.0 * (positions * (24 * d * d + 4 * seq * d) + 2 * d * vocab + relaxed * 32 * rank * d)


# ---------------------------------------------------------------------------------------------- data


class Windows(Dataset):
    """Training windows at precomputed offsets, in order (``train_sampling_strategy='sequential'``)."""

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, seq_len: int):
        self.ids, self.offsets, self.seq_len = ids, offsets, seq_len

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        o = int(self.offsets[i])
        x = self.ids[o: o + self.seq_len]
        return {"input_ids": x, "labels": x}


class Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def load_data(regime: dict[str, Any]) -> dict[str, Any]:
    """Character vocabulary, training ids, validation and test blocks (fixed, disjoint)."""
    text = shared_path(DATA_FILE).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    cut = int(regime["train_frac"] * len(ids))
    train, held = ids[:cut], ids[cut:]
    seq = regime["seq_len"]
    n_blocks = len(held) // seq
    if n_blocks < regime["val_blocks"] + regime["test_blocks"]:
        raise SystemExit(f"charlm: held-out split has {n_blocks} blocks, need {regime['val_blocks'] + regime['test_blocks']}")
    blocks = held[: n_blocks * seq].view(n_blocks, seq)
    return {
        "vocab_size": len(chars), "train": train, "chars": len(text), "held_blocks": n_blocks,
        "val": blocks[: regime["val_blocks"]], "test": blocks[n_blocks - regime["test_blocks"]:],
    }


def window_offsets(seed: int, n: int, train_len: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, train_len - seq_len + 1, (n,), generator=torch.Generator().manual_seed(seed))


def sha(tensor_bytes: bytes) -> str:
    return hashlib.sha1(tensor_bytes).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- one cell


def training_args_class():
    from hf_dyntie import DynTieTrainingArguments

    return DynTieTrainingArguments


def missing_option(tie: dict[str, Any]) -> str | None:
    """Which requested option this checkout of hf_dyntie lacks (a field, a policy), or None."""
    cls = training_args_class()
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in tie:
        if key not in fields:
            return f"DynTieTrainingArguments has no option {key!r} (not implemented in this checkout)"
    policy = tie.get("tie_policy")
    from hf_dyntie.training.policies import POLICIES

    if policy is not None and policy not in POLICIES:
        return f"tie_policy {policy!r} does not exist in this checkout (have: {', '.join(POLICIES)})"
    return None


def make_training_args(row: dict[str, Any], regime: dict[str, Any], seed: int, eval_every: int, out_dir: Path,
                       device: str = "cpu"):
    cls = training_args_class()
    steps = row["steps"]
    kwargs = dict(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=regime["batch_size"],
        per_device_eval_batch_size=regime["eval_batch_size"],
        learning_rate=regime["lr"],
        weight_decay=regime["weight_decay"],
        adam_beta1=regime["betas"][0],
        adam_beta2=regime["betas"][1],
        max_grad_norm=regime["max_grad_norm"],
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(round(regime["warmup_frac"] * steps))),
        eval_strategy="steps",
        eval_steps=eval_every,
        logging_steps=eval_every,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="sequential",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        tie_plots=False,
    )
    kwargs.update(row["tie"])  # the row's tie_* settings and any --set override win
    return cls(**kwargs)


def check_cell_options(row: dict[str, Any], regime: dict[str, Any], eval_every: int) -> None:
    """Raise HarnessError (one line) when this checkout cannot build the row's arguments."""
    missing = missing_option(row["tie"])
    if missing:
        raise HarnessError(missing)
    probe = row
    if row["tie"].get("tie_policy") == "replay" and not row["tie"].get("tie_replay_file"):
        probe = {**row, "tie": {**row["tie"], "tie_replay_file": "<written when the cell runs>"}}
    try:
        make_training_args(probe, regime, 0, eval_every, RUNS_ROOT / "_check")
    except (ValueError, TypeError) as error:
        raise HarnessError(f"DynTieTrainingArguments refused the row's options: {str(error).splitlines()[0]}") from None


def final_map_of(source: str, seed: int, cells: list[dict[str, Any]]) -> list[int]:
    for cell in cells:
        if cell["row"] == source and cell["seed"] == seed:
            return list(cell["final_tie_map"])
    raise HarnessError(f"no finished cell of row {source!r} for seed {seed} to take the final map from")


def unique_over_time(records: list[dict[str, Any]], steps: int) -> list[tuple[int, int]]:
    """(step, unique layers) at every change, from the decision records."""
    from hf_dyntie.tie_map import maps_per_step, num_unique_layers

    out: list[tuple[int, int]] = []
    for step, m in enumerate(maps_per_step(records, steps)):
        u = num_unique_layers(m)
        if not out or out[-1][1] != u:
            out.append((step, u))
    return out


def run_cell(name: str, seed: int, row: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Train one (row, seed) cell and return its record."""
    from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel, DynTieTrainer
    from transformers import PrinterCallback, TrainerCallback, default_data_collator

    regime, data, eval_every = ctx["regime"], ctx["data"], ctx["eval_every"]
    steps = row["steps"]
    run_dir = ctx["runs_root"] / f"{name.replace(':', '-')}_seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    if name.startswith(FINAL_MAP):  # a one-record history the replay policy holds for the whole run
        history = run_dir / "tie_history.jsonl"
        history.write_text(json.dumps({"step": 0, "tie_map": row["source_map"]}) + "\n")
        row["tie"]["tie_replay_file"] = str(history)
    targs = make_training_args(row, regime, seed, eval_every, run_dir / "trainer", ctx["device"])

    offsets = window_offsets(seed, steps * regime["batch_size"], len(data["train"]), regime["seq_len"])
    torch.manual_seed(seed)
    config = DynTieGPT2Config(**gpt2_config_kwargs(row["layers"], regime["embd"], regime["heads"], regime["seq_len"],
                                                   data["vocab_size"]))
    model = DynTieGPT2LMHeadModel(config)
    init_sha = sha(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))

    class Curve(TrainerCallback):
        def __init__(self):
            self.points: list[tuple[int, float]] = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                self.points.append((state.global_step, float(metrics["eval_loss"]) / math.log(2)))

    class Progress(TrainerCallback):
        def __init__(self):
            self.bar = tqdm(total=steps, desc=f"{name} seed {seed}", mininterval=10, file=sys.stdout)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    class Trainer(DynTieTrainer):
        """Times its evaluations so the training wall time can exclude them."""

        eval_seconds = 0.0

        def evaluate(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.eval_seconds += time.perf_counter() - t0

    curve = Curve()
    trainer = Trainer(
        model=model, args=targs, train_dataset=Windows(data["train"], offsets, regime["seq_len"]),
        eval_dataset=Blocks(data["val"]), data_collator=default_data_collator, callbacks=[curve, Progress()],
    )
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0 - trainer.eval_seconds
    in_train_eval_seconds = trainer.eval_seconds
    if not curve.points or curve.points[-1][0] != trainer.state.global_step:
        trainer.evaluate()  # the final validation point (Curve records it)
    val_bpc = curve.points[-1][1]
    test_bpc = trainer.evaluate(eval_dataset=Blocks(data["test"]), metric_key_prefix="test")["test_loss"] / math.log(2)

    summary = trainer.dyntie_summary()
    history_path = Path(targs.output_dir) / "tie_history.jsonl"
    raw = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()] if history_path.exists() else []
    records = []
    for r in raw:
        rec = {"step": r["step"], "tie_map": r["tie_map"]}
        for key in ("layer", "action", "reward", "scores"):
            if r.get(key) is not None:
                rec[key] = r[key]
        records.append(rec)
    if not records:  # a replayed static map makes no decisions: record the map it ran
        records = [{"step": 0, "tie_map": summary["final_tie_map"]}]
    over_time = unique_over_time(records, steps)
    positions = row["layers"]
    relaxed = positions - summary["mean_unique_layers"] if row["tie"].get("tie_lora_rank") else 0.0
    flops = flops_per_step(positions, regime["embd"], regime["seq_len"], data["vocab_size"], relaxed,
                           int(row["tie"].get("tie_lora_rank") or 0))
    flops8 = flops_per_step(POSITIONS, regime["embd"], regime["seq_len"], data["vocab_size"])
    return {
        "row": name,
        "seed": seed,
        "settings": {k: v for k, v in row["tie"].items() if k != "tie_replay_file"},
        "source_map": row.get("source_map"),
        "hparams": ctx["hparams"],
        "machine": ctx["machine"],
        "steps": steps,
        "num_layers": positions,
        "val_bpc": val_bpc,
        "test_bpc": test_bpc,
        "curve": curve.points,
        "final_tie_map": summary["final_tie_map"],
        "final_unique_layers": summary["final_unique_layers"],
        "mean_unique_layers": summary["mean_unique_layers"],
        "mean_trainable_parameters": summary["mean_trainable_parameters"],
        "final_trainable_parameters": summary["final_trainable_parameters"],
        "training_state_bytes": summary["training_state_bytes"],
        "train_seconds": train_seconds,
        "in_train_eval_seconds": in_train_eval_seconds,
        "seconds_per_step": train_seconds / max(1, steps),
        "flops_per_step_ratio": flops / flops8,
        "total_flops_ratio": flops * steps / (flops8 * ctx["hparams"]["steps"]),
        "unique_layers_over_time": over_time,
        "tie_history": records,
        "data_sha": sha(offsets.numpy().tobytes()),
        "init_sha": init_sha,
    }


# ---------------------------------------------------------------------------------------------- cells file


def read_cells(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    cells = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                cells.append(with_start_map(json.loads(line)))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: that cell reruns
                print(f"charlm: ignoring a truncated line in {path}", flush=True)
    return cells


DYNAMIC_POLICIES = ("grow", "greedy", "qlearning", "random")


def with_start_map(cell: dict[str, Any]) -> dict[str, Any]:
    """Cells written before 2026-12-07: their tie history began at the first decision, and the trainer's mean
    unique layers treated that decision's map as held from step 0 (for ``grow``, which starts all tied, an
    overestimate of up to 0.17 layers). Such a cell gets its start map (every dynamic row starts all tied) at
    step 0, and its step-weighted means are recomputed: unique layers from the maps, trainable parameters
    moved by the same number of GPT-2 blocks (12 d^2 + 13 d each, less a relaxed delta's 16 d r)."""
    from hf_dyntie.tie_map import maps_per_step, num_unique_layers

    settings = cell.get("settings") or {}
    history = cell.get("tie_history") or []
    if (settings.get("tie_policy") not in DYNAMIC_POLICIES or settings.get("tie_init") != "all_tied" or not history
            or history[0]["step"] == 0 or cell.get("start_corrected")):
        return cell
    records = [{"step": 0, "tie_map": [0] * cell["num_layers"]}, *history]
    maps = maps_per_step(records, cell["steps"])
    mean_unique = sum(num_unique_layers(m) for m in maps) / len(maps)
    d, rank = cell["hparams"]["embd"], int(settings.get("tie_lora_rank") or 0)
    per_layer = 12 * d * d + 13 * d - 16 * d * rank
    shift = mean_unique - cell["mean_unique_layers"]
    return {**cell, "tie_history": records, "mean_unique_layers": mean_unique,
            "mean_trainable_parameters": cell["mean_trainable_parameters"] + shift * per_layer,
            "start_corrected": True}


def append_cell(path: Path, cell: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(cell) + "\n")
        f.flush()


# ---------------------------------------------------------------------------------------------- summary


def by_row(cells: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for c in cells:
        rows.setdefault(c["row"], {})[c["seed"]] = c  # a duplicate (row, seed) keeps the later line
    return rows


def choose_best_static(rows: dict[str, dict[int, dict[str, Any]]]) -> tuple[str | None, dict[str, float]]:
    """The static-u row with the lowest mean validation bpc over the seeds *every* static row has (a row with
    more seeds must not win or lose by its extra seeds); its mean over those seeds for each row. Chosen on
    validation, never on test."""
    present = [r for r in STATIC_U_ROWS if r in rows]
    if not present:
        return None, {}
    common = set.intersection(*(set(rows[r]) for r in present))
    if not common:  # no shared seed: fall back to each row's own mean
        common_of = {r: set(rows[r]) for r in present}
    else:
        common_of = {r: common for r in present}
    means = {r: sum(rows[r][s]["val_bpc"] for s in common_of[r]) / len(common_of[r]) for r in present}
    return min(means, key=means.get), means


def summarize(cells: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    rows = by_row(cells)
    best_static, statics = choose_best_static(rows)
    out = []
    for name, seeds in rows.items():
        cs = [seeds[s] for s in sorted(seeds)]
        entry: dict[str, Any] = {
            "row": name,
            "seeds": sorted(seeds),
            "n": len(cs),
            "steps": cs[0]["steps"],
            "num_layers": cs[0]["num_layers"],
            "settings": cs[0]["settings"],
            "val_bpc": mean_ci([c["val_bpc"] for c in cs]),
            "test_bpc": mean_ci([c["test_bpc"] for c in cs]),
            "mean_unique_layers": sum(c["mean_unique_layers"] for c in cs) / len(cs),
            "final_unique_layers": sum(c["final_unique_layers"] for c in cs) / len(cs),
            "mean_trainable_parameters": sum(c["mean_trainable_parameters"] for c in cs) / len(cs),
            "training_state_bytes": sum(c["training_state_bytes"] for c in cs) / len(cs),
            "flops_per_step_ratio": cs[0]["flops_per_step_ratio"],
            "total_flops_ratio": cs[0]["total_flops_ratio"],
            "train_seconds": sum(c["train_seconds"] for c in cs) / len(cs),
            "final_tie_maps": {str(c["seed"]): c["final_tie_map"] for c in cs},
        }
        if len(cs) < 2:
            entry["note"] = "one seed: no confidence interval"
        for ref_name, label in ((BASELINE, "untied8"), (best_static, "best_static")):
            for key in ("val_bpc", "test_bpc"):
                if ref_name == name:
                    entry[f"diff_{key}_vs_{label}"] = {"reference": True}
                else:
                    entry[f"diff_{key}_vs_{label}"] = paired(seeds, rows[ref_name], key) if ref_name in rows else None
        if BASELINE in rows:
            common = sorted(set(seeds) & set(rows[BASELINE]))
            ratios = [seeds[s]["train_seconds"] / rows[BASELINE][s]["train_seconds"] for s in common]
            entry["wall_ratio_vs_untied8"] = sum(ratios) / len(ratios) if ratios else None
        out.append(entry)
    out.sort(key=lambda e: (row_rank(e["row"]), e["row"]))
    return {"meta": meta, "best_static_u": best_static, "best_static_means": statics, "rows": out}


def row_rank(name: str) -> int:
    """ROWS order (a tagged variant right after its base row), final_map rows last."""
    if name.startswith(FINAL_MAP):
        return len(ROWS)
    bases = [i for i, r in enumerate(ROWS) if name == r or name.startswith(r + "_")]
    return max(bases) if bases else len(ROWS)


def fmt_ci(stats: dict[str, Any] | None, digits: int = 4) -> str:
    if not stats or stats.get("mean") is None:
        return ""
    if stats.get("ci95") is None:
        return f"{stats['mean']:.{digits}f} (n=1)"
    return f"{stats['mean']:.{digits}f} ± {stats['ci95']:.{digits}f}"


def fmt_diff(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    if stats.get("reference"):
        return "0 (reference)"
    if stats.get("ci95") is None:
        return f"{stats['mean']:+.4f} (n=1, no CI)"
    return f"{stats['mean']:+.4f} [{stats['lo']:+.4f}, {stats['hi']:+.4f}]" + (" **real**" if stats["real"] else "")


def markdown(summary: dict[str, Any]) -> str:
    meta = summary["meta"]
    table = []
    for e in summary["rows"]:
        table.append({
            "row": e["row"], "n": e["n"], "steps": e["steps"],
            "val": fmt_ci(e["val_bpc"]), "test": fmt_ci(e["test_bpc"]),
            "d8": fmt_diff(e.get("diff_val_bpc_vs_untied8")), "ds": fmt_diff(e.get("diff_val_bpc_vs_best_static")),
            "dt8": fmt_diff(e.get("diff_test_bpc_vs_untied8")),
            "unique": f"{e['mean_unique_layers']:.2f} / {e['final_unique_layers']:.2f}",
            "params": f"{e['mean_trainable_parameters'] / 1e3:.0f}k",
            "state": f"{e['training_state_bytes'] / 2**20:.2f} MiB",
            "flops": f"{e['flops_per_step_ratio']:.3f} ({e['total_flops_ratio']:.2f})",
            "wall": "" if e.get("wall_ratio_vs_untied8") is None else f"{e['wall_ratio_vs_untied8']:.2f}",
        })
    cols = ["row", "n", "steps", "val", "test", "d8", "ds", "dt8", "unique", "params", "state", "flops", "wall"]
    heads = ["row", "seeds", "steps", "val bpc (mean ± 95% t-CI)", "test bpc", "Δ val vs untied8 [CI]",
             f"Δ val vs best static-u ({summary['best_static_u']}) [CI]", "Δ test vs untied8 [CI]",
             "mean / final unique", "mean trainable", "train state", "FLOPs/step (total) vs untied8",
             "wall ratio vs untied8"]
    return (
        f"Char-level Tiny Shakespeare ({meta['train_chars']} training chars, vocab {meta['vocab_size']}), "
        f"{POSITIONS} positions x d {meta['regime']['embd']} ({meta['regime']['heads']} heads), seq "
        f"{meta['regime']['seq_len']}, batch {meta['regime']['batch_size']}, {meta['steps']} base steps, budget u = "
        f"{meta['budget']}. Validation = first {meta['regime']['val_blocks']} held-out blocks, test = last "
        f"{meta['regime']['test_blocks']} (evaluated once per cell). Bits per character. CIs: Student t, n-1 dof; "
        "differences are paired by seed and marked **real** only when the 95% CI excludes 0. Rows with one seed "
        "have no CI. FLOPs: analytic (see `flops_per_step`), per step and (in brackets) for the whole run. "
        "Wall: training only (evaluations excluded), same-seed ratio, noisy on a shared CPU.\n\n"
        + md_table(table, cols, heads)
    )


def plot_all(cells: list[dict[str, Any]], summary: dict[str, Any], output: Path, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = by_row(cells)
    written = []
    # 1. validation bpc vs steps, mean with a t-CI band per row
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for row, seeds in rows.items():
        curves = [dict(c["curve"]) for c in seeds.values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        stats = [mean_ci([c[s] for c in curves]) for s in steps]
        means = [s["mean"] for s in stats]
        line, = ax.plot(steps, means, marker=".", label=f"{row} (n={len(curves)})")
        if stats[0]["ci95"] is not None:
            ax.fill_between(steps, [s["lo"] for s in stats], [s["hi"] for s in stats], alpha=0.15,
                            color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation bits/char")
    ax.set_title(f"{name}: validation bits/char (band: 95% t-CI over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    lows = [y for coll in ax.collections for path in coll.get_paths() for y in path.vertices[:, 1]]
    lows += [y for line in ax.get_lines() for y in line.get_ydata()]
    if lows:  # the end of training is what matters: clip the first, steep part of the curves
        ax.set_ylim(min(lows) - 0.02, min(lows) + 1.2)
    fig.tight_layout()
    path = output / f"{name}_val_bpc.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path.name)
    # 2. unique layers over time, dynamic rows
    dynamic = {r: s for r, s in rows.items() if any(len(c["unique_layers_over_time"]) > 1 for c in s.values())}
    if dynamic:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, (row, seeds) in enumerate(dynamic.items()):
            color = f"C{i % 10}"
            for j, c in enumerate(seeds.values()):
                pts = c["unique_layers_over_time"] + [(c["steps"], c["unique_layers_over_time"][-1][1])]
                ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=color, alpha=0.7,
                        label=row if j == 0 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("unique layers")
        ax.set_title(f"{name}: unique layers over time (one line per seed)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = output / f"{name}_unique_layers.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    # 3. final maps: one line per (row, seed), colour = root
    labels, maps = [], []
    for row, seeds in rows.items():
        for s in sorted(seeds):
            m = seeds[s]["final_tie_map"]
            labels.append(f"{row} s{s}")
            maps.append(m + [float("nan")] * (POSITIONS - len(m)))
    if maps:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(maps) + 1.2))
        ax.imshow(maps, cmap="tab10", vmin=0, vmax=9, aspect="auto")
        for i, m in enumerate(maps):
            for j, v in enumerate(m):
                if v == v:
                    ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xticks(range(POSITIONS))
        ax.set_xlabel("position (number, colour: the root whose weights it runs)")
        ax.set_title(f"{name}: final tie maps")
        fig.tight_layout()
        path = output / f"{name}_final_maps.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def write_summary(cells_path: Path, output: Path, name: str, meta: dict[str, Any]) -> Path | None:
    cells = read_cells(cells_path)
    if not cells:
        print(f"charlm: no cells in {cells_path} yet", flush=True)
        return None
    summary = summarize(cells, meta)
    summary["cells_file"] = cells_path.name
    summary["plots"] = plot_all(cells, summary, output, name)
    machine = dict(cells[-1].get("machine") or machine_info())  # where the cells ran, not where this summarizes
    machine["command"] = machine_info()["command"]
    json_path, _ = write_results(output, name, {"machine": machine, **summary}, markdown(summary))
    return json_path


# ---------------------------------------------------------------------------------------------- SNR probe


def retie_like_trainer(model, optimizer, tie_map: list[int]) -> None:
    """``model.retie`` plus what DynTieTrainer does to the optimizer state: carry it along the report's ``moves``."""
    from hf_dyntie.training.optimizer_state import carry_optimizer_state

    carry_optimizer_state(optimizer, model.retie(tie_map).moves)


def snr_probe(args: argparse.Namespace, regime: dict[str, Any], data: dict[str, Any], output: Path) -> Path:
    """The action-effect SNR probe of the diagnosis (diag/action_snr.py) in this regime.

    Train ``sequence_u`` (share mode, the harness's optimizer and schedule, seed ``--seeds[0]``) to 50% of a
    ``--steps`` run; for every distinct map one action (tie position l to an earlier root, or untie it,
    l = 1..7) reaches from there, restore the snapshot, apply it with ``model.retie`` and drop the optimizer
    state of the reset parameters (as DynTieTrainer does), train ``--snr-horizon`` steps, and score the
    validation slice. Each map is run under ``--snr-orders`` data orders (the same batches for every map of
    one order), keep included. Effect(m, o) = val(m, o) - val(keep, o): paired within an order. Signal =
    sd over maps of the order-mean effect; noise = the pooled sd of one map's effect across orders. The
    diagnosis asks signal >= 3x noise before any controller can be evaluated here."""
    from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel
    from hf_dyntie.training.policies.static import sequence_map
    from hf_dyntie.tie_map import apply_actions

    seed, steps, orders, device = args.seed_list[0], args.steps, args.snr_orders, args.device
    pre = steps // 2
    horizon = min(args.snr_horizon, steps - pre)  # never past the end of the schedule
    bs, seq = regime["batch_size"], regime["seq_len"]
    warm = max(1, int(round(regime["warmup_frac"] * steps)))

    def lr_at(t: int) -> float:  # transformers' cosine schedule with linear warm-up
        if t < warm:
            return regime["lr"] * t / warm
        return regime["lr"] * 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm)))

    def make_optimizer(model):
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in model.named_parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": regime["weight_decay"]},
                                  {"params": rest, "weight_decay": 0.0}], lr=regime["lr"], betas=regime["betas"])

    def train_steps(model, opt, windows, t_start):
        model.train()
        for k, offsets in enumerate(windows):
            x = torch.stack([data["train"][o: o + seq] for o in offsets.tolist()]).to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(t_start + k)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                           regime["max_grad_norm"])
            opt.step()

    @torch.no_grad()
    def val_bpc(model) -> float:
        model.eval()
        total, n = 0.0, 0
        for i in range(0, len(data["val"]), regime["eval_batch_size"]):
            x = data["val"][i: i + regime["eval_batch_size"]].to(device)
            total += model(input_ids=x, labels=x).loss.item() * len(x)
            n += len(x)
        model.train()
        return total / n / math.log(2)

    t0 = time.perf_counter()
    start_map = sequence_map(POSITIONS, args.budget)
    offsets = window_offsets(seed, pre * bs, len(data["train"]), seq).view(pre, bs)
    torch.manual_seed(seed)
    config = DynTieGPT2Config(**gpt2_config_kwargs(POSITIONS, regime["embd"], regime["heads"], seq,
                                                   data["vocab_size"]), tie_map=start_map, tie_mode="share")
    model = DynTieGPT2LMHeadModel(config).to(device)
    opt = make_optimizer(model)
    train_steps(model, opt, tqdm(offsets, desc="snr pre-train", mininterval=10, file=sys.stdout), 0)
    snapshot_val = val_bpc(model)
    snap_model, snap_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    print(f"snr: pre-trained {pre} steps of sequence_u{args.budget} in {time.perf_counter() - t0:.0f}s, "
          f"val {snapshot_val:.4f} bpc", flush=True)

    maps: dict[tuple[int, ...], str] = {tuple(start_map): "keep"}
    for layer in range(1, POSITIONS):
        for action in range(layer + 1):
            m = tuple(apply_actions(start_map, {layer: action}))
            maps.setdefault(m, f"l{layer}a{action}")
    order_windows = [window_offsets(10_000 + seed * 100 + o, horizon * bs, len(data["train"]), seq).view(horizon, bs)
                     for o in range(orders)]
    results = {label: {"tie_map": list(m), "val_bpc": []} for m, label in maps.items()}
    for m, label in tqdm(list(maps.items()), desc="snr maps", mininterval=10, file=sys.stdout):
        for o in range(orders):
            model.retie(start_map)
            model.load_state_dict(snap_model)
            opt.load_state_dict(snap_opt)
            retie_like_trainer(model, opt, list(m))
            train_steps(model, opt, order_windows[o], pre)
            results[label]["val_bpc"].append(val_bpc(model))
    keep = results["keep"]["val_bpc"]
    effects = {label: [v - k for v, k in zip(r["val_bpc"], keep)] for label, r in results.items() if label != "keep"}
    mean_effects = {label: sum(e) / len(e) for label, e in effects.items()}
    signal = statistics.stdev(mean_effects.values()) if len(mean_effects) > 1 else None
    noise = math.sqrt(sum(statistics.variance(e) for e in effects.values()) / len(effects)) if orders > 1 else None
    payload = {
        "machine": machine_info(),
        "meta": {"seed": seed, "steps": steps, "snapshot_step": pre, "horizon": horizon, "orders": orders,
                 "budget": args.budget, "start_map": start_map, "regime": regime, "snapshot_val_bpc": snapshot_val,
                 "seconds": time.perf_counter() - t0},
        "maps": results,
        "effects": effects,
        "mean_effects": mean_effects,
        "signal_sd": signal,
        "paired_noise_sd": noise,
        "snr": None if not signal or not noise else signal / noise,
        "go": None if not signal or not noise else bool(signal >= 3 * noise),
    }
    table = [{"map": label, "tie_map": results[label]["tie_map"], "effect": mean_effects.get(label, 0.0),
              "per_order": " ".join(f"{x:+.4f}" for x in effects.get(label, []))} for label in results]
    table.sort(key=lambda r: r["effect"])
    md = (f"Action-effect SNR probe: sequence_u{args.budget} trained {pre} of {steps} steps (seed {seed}), every "
          f"one-action map trained {horizon} more steps under {orders} data orders; effect = paired Δ validation "
          f"bits/char vs keep. Signal sd {signal}, paired noise sd {noise}, SNR {payload['snr']} "
          f"(go if >= 3).\n\n" + md_table(table, ["map", "tie_map", "effect", "per_order"]))
    name = "charlm_snr" + ("_quick" if args.quick else "")
    json_path, _ = write_results(output, name, payload, md)
    print(f"snr: signal sd {signal}, paired noise sd {noise}, SNR {payload['snr']} -> {json_path}", flush=True)
    return json_path


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="untied8,untied_u", help="comma-separated rows: " + ", ".join(ROWS) + ", final_map:<row>")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=1200, help="base optimizer steps (rows may multiply them)")
    p.add_argument("--budget", type=int, default=4, help="unique-layer budget u (1..8)")
    p.add_argument("--stage", default="screen", help="names the output files: charlm_<stage>_u<budget>*")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where cells train (cuda: one GPU; cells of one stage must not mix devices)")
    p.add_argument("--eval-every", type=int, default=100, help="validation curve interval (steps)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra DynTieTrainingArguments override for every row of this run (repeatable)")
    p.add_argument("--tag", default="", help="suffix of the row names of this run (variants: greedy_<tag>)")
    p.add_argument("--map-source", type=Path, default=None,
                   help="cells file final_map:<row> takes its maps from (default: this stage's cells file)")
    p.add_argument("--summarize-only", action="store_true", help="rebuild the summary from the cells file")
    p.add_argument("--quick", action="store_true", help="tiny model, slices and steps (seconds; for the test)")
    p.add_argument("--runs-root", type=Path, default=RUNS_ROOT, help="scratch trainer folders (outside the repo)")
    p.add_argument("--snr-probe", action="store_true", help="run the action-effect SNR probe instead of cells")
    p.add_argument("--snr-horizon", type=int, default=32)
    p.add_argument("--snr-orders", type=int, default=2)
    args = p.parse_args(argv)
    if not 1 <= args.budget <= POSITIONS:
        raise SystemExit(f"charlm: --budget must lie in 1..{POSITIONS}, got {args.budget}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"charlm: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in args.row_list:
        check_row_name(r)
    args.set_dict = parse_sets(args.sets)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("charlm: --device cuda, but torch sees no CUDA device")
    if args.quick:
        args.steps, args.eval_every = QUICK_STEPS, QUICK_EVAL_EVERY
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # fails fast: unknown row, bad budget
    regime = QUICK if args.quick else REGIME
    stage = args.stage + ("_quick" if args.quick else "")
    name = f"charlm_{stage}_u{args.budget}"
    cells_path = args.output / f"{name}_cells.jsonl"
    data = load_data(regime)  # SystemExit "SKIP: ..." when the data file is missing
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    hparams = {"steps": args.steps, "budget": args.budget, "eval_every": args.eval_every, "quick": args.quick,
               "device": args.device,
               **{k: v for k, v in regime.items()}}
    meta = {"stage": args.stage, "budget": args.budget, "steps": args.steps, "eval_every": args.eval_every,
            "regime": regime, "vocab_size": data["vocab_size"], "train_chars": len(data["train"]),
            "held_out_blocks": data["held_blocks"], "threads": args.threads, "quick": args.quick,
            "flops_formula": flops_per_step.__doc__}
    if args.snr_probe:
        snr_probe(args, regime, data, args.output)
        return 0
    if args.summarize_only:
        write_summary(cells_path, args.output, name, meta)
        return 0

    done_cells = read_cells(cells_path)
    for c in done_cells:
        h = c.get("hparams", {})
        if h.get("steps") != args.steps or h.get("quick") != args.quick or h.get("device", "cpu") != args.device:
            raise SystemExit(f"charlm: {cells_path} holds cells with steps={h.get('steps')} quick={h.get('quick')} "
                             f"device={h.get('device', 'cpu')}; this run asks steps={args.steps} quick={args.quick} "
                             f"device={args.device}: use another --stage")
    done = {(c["row"], c["seed"]) for c in done_cells}
    suffix = f"_{args.tag}" if args.tag else ""
    plan: list[tuple[str, str, int, dict[str, Any]]] = []  # (cell name, requested row, seed, resolved row)
    failed: list[str] = []
    checked: dict[str, str | None] = {}
    for seed in args.seed_list:  # seed-major: complete pairs come first
        for row_name in args.row_list:
            cell_name = row_name + suffix
            if (cell_name, seed) in done:
                continue
            row = resolve_row(row_name, args.budget, args.steps, args.set_dict)
            if row_name not in checked:
                try:
                    check_cell_options(row, regime, args.eval_every)
                    checked[row_name] = None
                except HarnessError as error:
                    checked[row_name] = str(error)
            if checked[row_name]:
                failed.append(f"{cell_name} seed {seed}: {checked[row_name]}")
                print(f"charlm: SKIP {cell_name} seed {seed}: {checked[row_name]}", flush=True)
                continue
            plan.append((cell_name, row_name, seed, row))
    print(f"charlm: {name}: {len(done)} cells done, {len(plan)} to run -> {cells_path}", flush=True)

    ctx = {"regime": regime, "data": data, "eval_every": args.eval_every, "hparams": hparams,
           "device": args.device, "machine": machine_info(),
           "runs_root": args.runs_root / name}
    for cell_name, row_name, seed, row in plan:
        try:
            if row_name.startswith(FINAL_MAP):
                source = row_name[len(FINAL_MAP):]
                row["source_map"] = final_map_of(source, seed, read_cells(args.map_source or cells_path))
            cell = run_cell(cell_name, seed, row, ctx)
        except HarnessError as error:
            failed.append(f"{cell_name} seed {seed}: {error}")
            print(f"charlm: SKIP {cell_name} seed {seed}: {error}", flush=True)
            continue
        except Exception as error:  # one broken cell must not take the others down
            first = (str(error).splitlines() or [""])[0]
            failed.append(f"{cell_name} seed {seed}: {type(error).__name__}: {first}")
            print(f"charlm: FAILED {cell_name} seed {seed}: {type(error).__name__}: {first}", flush=True)
            traceback.print_exc(file=sys.stderr)
            continue
        append_cell(cells_path, cell)
        print(f"charlm: {cell_name} seed {seed}: val {cell['val_bpc']:.4f} bpc, test {cell['test_bpc']:.4f} bpc, "
              f"unique {cell['mean_unique_layers']:.2f}/{cell['final_unique_layers']}, train {cell['train_seconds']:.0f}s "
              f"({cell['seconds_per_step']:.3f} s/step)", flush=True)
        write_summary(cells_path, args.output, name, meta)
    if failed:
        print("charlm: cells not run:\n  " + "\n  ".join(failed), flush=True)
        return 1
    if not plan and cells_path.exists():
        print("charlm: nothing to do (all requested cells are in the cells file)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
