"""``torch_compile=True`` under dynamic tying: compile the layer stack, routing outside the graph.

A whole-model graph specialises on the tie map (dynamo guards on which tensor each tied leaf reads), so it
recompiles at every new map and falls back to eager after ``recompile_limit``. ``DynTieMixin.compile_layers``
compiles each block with its weights handed in from outside instead (docs/design.md, "Compiled layers"); this
module states how often that can compile and sets it up for the trainer.
"""

from __future__ import annotations

import inspect

from transformers.utils import logging

from ..modeling_dyntie import DynTieMixin
from ..compiled import block_kinds

logger = logging.get_logger(__name__)


def compile_bound(model: DynTieMixin, tie_mode: str) -> int:
    """The most times the layer stack's compiled code compiles in a whole run, however many tie maps it visits.

    Graph kinds: training forwards take one graph (two in follow mode: a tied block's weights are detached, so
    its backward has no weight gradients), every no-grad forward (evaluation, held-out rewards, scoring
    candidate maps) one more. Each kind may compile twice: first for the shapes it meets, then once more with
    dynamic shapes when a batch of another shape comes (a last partial batch, another eval batch size). Blocks
    configured differently per position (``compiled.block_kinds``) multiply it. GPT-2, Llama and BERT with stock
    settings: 4 in share mode, 6 in follow mode. Relaxed ties (``tie_lora_rank``) add their delta only in tied
    blocks, so tied and untied blocks are separate graphs in every mode: 8 in either mode. Relaxed roots
    (``tie_lora_roots``) add, in follow mode only, a third training graph (own weights with gradients plus a
    delta): 10."""
    relaxed = model.config.tie_lora_rank > 0
    relaxed_roots = relaxed and model.config.tie_lora_roots and tie_mode == "follow"
    kinds = (2 if tie_mode == "follow" or relaxed else 1) + (2 if relaxed else 1) + (1 if relaxed_roots else 0)
    return 2 * kinds * block_kinds(model.dyntie_layers)


def compile_for_training(model: DynTieMixin, backend: str | None, mode: str | None) -> bool:
    """Compile ``model``'s layers for a ``DynTieTrainer`` run, warning first when this run's settings could
    compile more often than dynamo allows before it falls back to eager. Returns whether the model's forward
    takes ``use_cache`` (the trainer then passes ``use_cache=False``: a KV cache is per position, and a block
    carrying one runs eagerly)."""
    import torch._dynamo

    bound = compile_bound(model, model.config.tie_mode)
    limit = int(torch._dynamo.config.recompile_limit)
    kinds = block_kinds(model.dyntie_layers)
    if bound > limit:
        logger.warning(
            f"torch_compile: this model may compile its layers up to {bound} times ({kinds} differently "
            f"configured block(s), tie_mode={model.config.tie_mode!r}), more than torch._dynamo.config."
            f"recompile_limit={limit}: past it dynamo runs the layers eagerly. Raise recompile_limit to {bound}."
        )
    if mode in ("reduce-overhead", "max-autotune") and torch.cuda.is_available():
        logger.warning(
            f"torch_compile_mode={mode!r} records CUDA graphs on the weights' addresses; a tied position reads its "
            "root's weights, so a new tie map re-records them. Prefer the default mode with dynamic tying."
        )
    model.compile_layers(backend=backend or "inductor", mode=mode)
    logger.info(f"torch_compile: layers compiled with the routing outside the graph (at most {bound} compilations)")
    return "use_cache" in inspect.signature(type(model).forward).parameters
