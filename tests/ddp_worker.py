"""Worker for test_trainer.test_two_processes_agree: train under torchrun and dump what each rank saw."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import MapRecorder, OptimizerHygiene, byte_blocks, make_args, stock_copy, tiny_model  # noqa: E402

from hf_dyntie.convert import from_stock  # noqa: E402
from hf_dyntie.training.trainer import DynTieTrainer  # noqa: E402


def main(out: Path) -> None:
    recorder = MapRecorder()
    args = make_args(out / "run", max_steps=16, per_device_train_batch_size=2, tie_init="untied")
    hygiene = OptimizerHygiene()  # tied parameters: no grad, no optimizer state, root storage (under DDP too)
    trainer = DynTieTrainer(
        model=tiny_model(), args=args, train_dataset=byte_blocks(), callbacks=[recorder, hygiene]
    )
    recorder.trainer = hygiene.trainer = trainer
    trainer.train()
    assert hygiene.checked > 0 and len(hygiene.group_sizes) == 1
    assert trainer.args.world_size == 2, "expected two processes"
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
    rank = trainer.args.process_index
    state = {k: v.detach().clone().contiguous() for k, v in trainer.dyntie_model.state_dict().items()}
    state = {k: v for k, v in state.items() if k not in set(trainer.dyntie_model.tied_parameter_names())}
    state.pop("lm_head.weight", None)
    save_file(state, out / f"rank{rank}.safetensors")
    # the scored controller: every rank scores its shard of the eval set, the scores are averaged, so every
    # rank must take the same decisions, and its untie carries the same AdamW state on every rank; with relaxed
    # ties (each untie folds a trained delta), so the deltas must agree across ranks too
    scored = MapRecorder()
    args = make_args(out / "greedy", max_steps=12, per_device_train_batch_size=2, tie_policy="greedy",
                     tie_budget=3, tie_interval=3, tie_score_tokens=128, tie_score_margin=0.0, tie_lora_rank=2)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks(),
                            eval_dataset=byte_blocks(16), callbacks=[scored])
    scored.trainer = trainer
    trainer.train()
    scores = [[e["score"] for e in r.get("scores", [])] for r in trainer.history.records]
    relaxed = {k: v.detach().clone().contiguous() for k, v in trainer.dyntie_model.state_dict().items() if "tie_delta" in k}
    save_file(relaxed, out / f"rank{rank}_deltas.safetensors")
    # shrink from trained weights, scored order, averaged merges and SVD refits (issue 23.3): every merge takes an
    # SVD of weights that must be the same on every rank, since DDP broadcasts parameters only once, at the wrap
    shrunk = MapRecorder()
    args = make_args(out / "shrink", max_steps=12, per_device_train_batch_size=2, tie_policy="shrink", tie_budget=2,
                     tie_shrink_order="scored", tie_shrink_until=0.75, tie_interval=1, tie_merge="average",
                     tie_score_tokens=128, tie_lora_rank=2, tie_lora_init="svd", tie_lora_vectors=True)
    trainer = DynTieTrainer(model=from_stock(stock_copy(tiny_model(seed=5))), args=args, train_dataset=byte_blocks(),
                            eval_dataset=byte_blocks(16), callbacks=[shrunk])
    shrunk.trainer = trainer
    trainer.train()
    state = {k: v.detach().clone().contiguous() for k, v in trainer.dyntie_model.state_dict().items()}
    tied = set(trainer.dyntie_model.tied_parameter_names())
    save_file({k: v for k, v in state.items() if k not in tied and k != "lm_head.weight"},
              out / f"rank{rank}_shrink.safetensors")
    seen = {"maps": recorder.maps, "greedy_maps": scored.maps, "scores": scores, "shrink_maps": shrunk.maps}
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
