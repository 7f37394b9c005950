"""Worker for test_sharding: DynTie models under FSDP2 in two gloo processes, against single-process twins.

Every rank trains its half of each global batch on the sharded model; rank 0 also trains a twin (the same
model, unsharded, on the whole batch) and writes what the test compares: losses per step, gradient errors,
local parameter bytes, the gathered checkpoint and the twin's logits.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate import FullyShardedDataParallelPlugin, PartialState
from accelerate.utils.fsdp_utils import (
    fsdp2_prepare_model,
    load_fsdp_model,
    load_fsdp_optimizer,
    save_fsdp_model,
    save_fsdp_optimizer,
)
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import VOCAB, gpt2_config, make  # noqa: E402

from hf_dyntie import DynTieGPT2LMHeadModel  # noqa: E402
from hf_dyntie.families import CAUSAL_LM, FAMILIES, MASKED_LM  # noqa: E402
from hf_dyntie.sharding import full_state_dict  # noqa: E402
from hf_dyntie.training.accounting import unique_storage_bytes  # noqa: E402
from hf_dyntie.training.optimizer_state import carry_optimizer_state, drop_state, fill_idle_state  # noqa: E402

MAP = [0, 0, 2, 0, 2, 5]
# step -> (new map, merge): a tie, an untie (grow's move: weights and AdamW moments copied), a merge
SCHEDULE = {2: ([0, 0, 0, 0, 0, 5], "discard"), 4: ([0, 1, 1, 3, 3, 5], "discard"), 6: ([0, 1, 1, 1, 3, 3], "average")}
STEPS = 8


def stand_in(**plugin_fields) -> SimpleNamespace:
    """What accelerate's FSDP2 functions read of an Accelerator: on a CPU, ``Accelerator(fsdp_plugin=...)`` falls
    back to DDP, so its wrap, save and load functions are called directly with this stand-in."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            state_dict_type="SHARDED_STATE_DICT", **plugin_fields)
    rank = dist.get_rank()
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, parallelism_config=None,
                           mixed_precision="no", is_main_process=rank == 0, process_index=rank,
                           num_processes=dist.get_world_size(), device=torch.device("cpu"),
                           wait_for_everyone=dist.barrier)


def accelerate_wrap(model):
    """accelerate's own FSDP2 wrap (``fsdp2_prepare_model``)."""
    return fsdp2_prepare_model(stand_in(), model)


def batch(step: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(100 + step))


def half(x: torch.Tensor) -> torch.Tensor:
    r = dist.get_rank()
    return x[2 * r: 2 * r + 2]


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def families() -> dict:
    """Every family, share / follow / relaxed (deltas, deltas and vector offsets, and relaxed roots): the loss and every gradient of
    one step against the twin."""
    out = {}
    for family in FAMILIES:
        head = family.head(CAUSAL_LM) or family.head(MASKED_LM)
        for name, fields in (("share", {}), ("follow", {"tie_mode": "follow"}), ("relaxed", {"tie_lora_rank": 2}),
                             ("relaxed_vectors", {"tie_lora_rank": 2, "tie_lora_vectors": True}),
                             ("relaxed_roots", {"tie_lora_rank": 2, "tie_lora_vectors": True, "tie_lora_roots": True})):
            twin, model = (make(family, head, tie_map=MAP, **fields).train() for _ in range(2))
            if family.name == "bert":  # accelerate's separate embedding unit fails for stock BERT on CPU too
                model.shard()
            else:
                model = accelerate_wrap(model)
            x = batch(0)
            loss = model(input_ids=half(x), labels=half(x)).loss
            loss.backward()
            twin_loss = twin(input_ids=x, labels=x).loss
            twin_loss.backward()
            grads = dict(twin.named_parameters())
            errors = [float((p.grad.full_tensor() - grads[n].grad).abs().max())
                      for n, p in model.named_parameters() if p.grad is not None]
            missing = [n for n, p in model.named_parameters() if p.grad is None and grads[n].grad is not None]
            out[f"{family.name}/{name}"] = {"loss": mean_over_ranks(loss), "twin": float(twin_loss),
                                            "grad_error": max(errors), "missing_grads": missing}
    return out


def gpt2(seed: int = 0) -> DynTieGPT2LMHeadModel:
    torch.manual_seed(seed)
    return DynTieGPT2LMHeadModel(gpt2_config(MAP, tie_lora_rank=2, tie_lora_vectors=True))


def train(model, optimizer, start: int, stop: int, sharded: bool) -> list[float]:
    losses = []
    for step in range(start, stop):
        if step in SCHEDULE:
            new, merge = SCHEDULE[step]
            # as DynTieTrainer with --tie_lora_init svd: new ties and rerouted ones refitted (gathers on every rank)
            carry_optimizer_state(optimizer, model.tie_trained(new, merge=merge, delta_init="svd").moves)
        x = batch(step)
        loss = model(input_ids=half(x) if sharded else x, labels=half(x) if sharded else x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss) if sharded else float(loss))
    return losses


def dynamic(out: Path) -> dict:
    """GPT-2 with relaxed ties (deltas and vector offsets, SVD-started) through a tie, a grow-style untie and an averaging merge; a DCP checkpoint
    halfway, resumed on a fresh sharded model; the gathered model saved with save_pretrained."""
    accelerator = stand_in()
    model = fsdp2_prepare_model(accelerator, gpt2())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = train(model, optimizer, 0, 4, sharded=True)
    checkpoint_map = model.tie_map
    (out / "checkpoint_map.json").write_text(json.dumps(checkpoint_map))
    plugin = accelerator.state.fsdp_plugin
    filled = fill_idle_state(optimizer, model.idle_parameters())  # what DynTieTrainer does around a save
    save_fsdp_model(plugin, accelerator, model, str(out / "ckpt"))
    save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(out / "ckpt"))
    drop_state(optimizer, filled)
    losses += train(model, optimizer, 4, STEPS, sharded=True)
    bytes_local = unique_storage_bytes(model.parameters())
    full = full_state_dict(model)  # what DynTieTrainer.save_model saves under FSDP2
    if dist.get_rank() == 0:
        model.save_pretrained(out / "saved", state_dict=full)

    resumed = fsdp2_prepare_model(accelerator, gpt2(seed=1))  # other initial weights: everything must come from the checkpoint
    resumed.retie(checkpoint_map)  # the tie map travels with the run (the trainer's policy state)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    # accelerate's own sharded load (a DCP template of every parameter, a strict load), then the idle state out
    load_fsdp_model(plugin, accelerator, resumed, str(out / "ckpt"))
    load_fsdp_optimizer(plugin, accelerator, resumed_optimizer, resumed, str(out / "ckpt"))
    drop_state(resumed_optimizer, resumed.idle_parameters())
    idle_with_state = [p for p in resumed.idle_parameters() if resumed_optimizer.state.get(p)]
    resumed_losses = train(resumed, resumed_optimizer, 4, STEPS, sharded=True)

    result = {"losses": losses, "resumed": resumed_losses, "idle_with_state": len(idle_with_state), "map": model.tie_map, "local_bytes": bytes_local}
    if dist.get_rank() == 0:
        twin = gpt2()
        twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
        result["twin"] = train(twin, twin_optimizer, 0, STEPS, sharded=False)
        result["twin_unique_bytes"] = unique_storage_bytes(twin.parameters())
        twin.eval()
        with torch.no_grad():
            save_file({"logits": twin(input_ids=batch(99)).logits}, out / "twin_logits.safetensors")
    return result


def ram_efficient_loading() -> dict:
    """accelerate's cpu_ram_efficient_loading: the model goes to meta before the wrap and rank 0's weights are
    broadcast into the shards after it; the tied model must still compute its twin's loss."""
    twin, model = gpt2(), fsdp2_prepare_model(stand_in(cpu_ram_efficient_loading=True), gpt2())
    x = batch(0)
    return {"loss": mean_over_ranks(model(input_ids=half(x), labels=half(x)).loss),
            "twin": float(twin(input_ids=x, labels=x).loss)}


def refusals() -> dict:
    """A wrap tying cannot run under is refused in one line at the first forward, not a DTensor traceback."""
    from torch.distributed.fsdp import fully_shard

    model = gpt2()  # relaxed: its deltas must be units of their own
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    try:
        model(input_ids=half(batch(0)))
    except ValueError as error:
        return {"blocks_only_relaxed": str(error)}
    return {"blocks_only_relaxed": None}


def scoring() -> dict:
    """greedy's scorer on the sharded model: candidate maps' held-out loss changes and first-order untie gains,
    every rank scoring its half of the batch and the scores averaged, against the twin scoring the whole."""
    from hf_dyntie.training.scoring import HeldOutScorer

    def scores(model, batches, reduce):
        scorer = HeldOutScorer(model, batches, lambda b: model(**b).loss, lambda: 1e-2, reduce)
        deltas = scorer.loss_deltas([[0, 0, 0, 0, 0, 5], [0, 1, 2, 0, 2, 5]])
        return deltas, scorer.untie_gains([(1, []), (4, [])])

    def average(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / dist.get_world_size()

    model = accelerate_wrap(gpt2())
    x = batch(7)
    sharded = scores(model, [{"input_ids": half(x), "labels": half(x)}], average)
    twin_x = [{"input_ids": x[2 * r: 2 * r + 2], "labels": x[2 * r: 2 * r + 2]} for r in (0, 1)]
    twin = gpt2()
    per_rank = [scores(twin, [b], lambda t: t) for b in twin_x]  # what each rank computes, then averaged
    expected = [[(a + b) / 2 for a, b in zip(*(s[k] for s in per_rank))] for k in (0, 1)]
    return {"sharded": sharded, "expected": expected, "map_after": model.tie_map}


def resume_on_one_process(out: Path) -> None:
    """The world-2 sharded checkpoint resumed by a single process (world 1, DCP reshards on load): it continues
    on the whole batch, which is what the two ranks trained together."""
    PartialState(cpu=True)
    torch.set_num_threads(1)
    accelerator = stand_in()
    model = fsdp2_prepare_model(accelerator, gpt2(seed=1))
    model.retie(json.loads((out / "checkpoint_map.json").read_text()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plugin = accelerator.state.fsdp_plugin
    load_fsdp_model(plugin, accelerator, model, str(out / "ckpt"))
    load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(out / "ckpt"))
    drop_state(optimizer, model.idle_parameters())
    (out / "world1.json").write_text(json.dumps({"losses": train(model, optimizer, 4, STEPS, sharded=False)}))
    dist.destroy_process_group()


def main(out: Path) -> None:
    PartialState(cpu=True)  # the process group (gloo), and the state accelerate's logging asks for
    torch.set_num_threads(1)
    result = {"families": families(), "dynamic": dynamic(out), "refusals": refusals(), "scoring": scoring(),
              "ram_efficient": ram_efficient_loading()}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--world1":
        resume_on_one_process(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
