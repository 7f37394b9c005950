"""Worker for test_families_training.test_two_processes_train_a_llama_alike: a DynTie Llama trained under torchrun."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import MapRecorder, byte_blocks, make_args, tiny_llama  # noqa: E402

from hf_dyntie.training.trainer import DynTieTrainer  # noqa: E402


def main(out: Path) -> None:
    recorder = MapRecorder()
    args = make_args(out / "run", max_steps=16, per_device_train_batch_size=2, tie_init="untied")
    trainer = DynTieTrainer(model=tiny_llama(), args=args, train_dataset=byte_blocks(), callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    assert trainer.args.world_size == 2, "expected two processes"
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
    model = trainer.dyntie_model
    tied = set(model.tied_parameter_names())
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in tied}
    rank = trainer.args.process_index
    save_file(state, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({"maps": recorder.maps}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
