"""The block family a char-level harness cell trains: GPT-2 (every stored cell) or Llama (issue 25, item 3).

The README recommends its recipe for Llama-family models, while the evidence of docs/RESULTS.md section 0 is
GPT-2 blocks; ``--family llama`` repeats rows on ``DynTieLlamaForCausalLM`` blocks of the same size: the same
depth, hidden size and heads (as many key/value heads as query heads: no grouped-query attention, so only the
block type changes), RoPE instead of learned positions, RMSNorm instead of LayerNorm, SwiGLU instead of the GELU
MLP, and the same choice of tied input/output embeddings (GPT-2 ties them by default; Llama's default does not,
so it is set).

**Matched parameters per layer.** A GPT-2 block at width d holds 12 d^2 + 13 d parameters (qkv 3 d^2 + 3 d,
out d^2 + d, MLP 8 d^2 + 5 d, two LayerNorms 4 d). A Llama block holds 4 d^2 (q, k, v, o, no biases) + 3 d I
(SwiGLU's gate, up and down maps of width I) + 2 d (two RMSNorms), so I is the integer that makes the two
closest. At d = 64 (the section 0 regime): **I = 174**, 49,920 parameters per Llama layer against 49,984 per
GPT-2 block (-64, -0.13%; I = 175 would give +128). The whole model differs a little more (403,584 against
412,352 parameters): Llama has no learned position table (seq 128 x d = 8,192) and one RMSNorm gain vector
at the end where GPT-2 has a LayerNorm's two. The --quick regime (d = 16) gets I = 46 by the same rule.

**Relaxed ties.** ``tie_lora_rank`` r gives each of a tied position's linear maps a rank-r delta: r (in + out)
parameters per map, so 16 d r per GPT-2 block (its four maps) but (4 x 2 d + 3 (d + I)) r = (11 d + 3 I) r
per Llama block (seven maps): 1,226 r at d = 64. At u = 4 of 8 (4 tied positions) the GPT-2 rows' "one
layer's parameters" rank was 12 (49,152 of 49,984); the Llama equivalent is **rank 10** (49,040 of 49,920,
98.2%). At u = 2 (6 tied positions) the GPT-2 r8 / r16 (one / two layers') become r7 / r14 (51,492 /
102,984 against 49,920 / 99,840).

Cells record ``"family"`` in their hparams; a cell without it was written before this option and is GPT-2.
"""

from __future__ import annotations

from typing import Any

DEFAULT_FAMILY = "gpt2"
FAMILIES = ("gpt2", "llama")


def cell_family(cell: dict[str, Any]) -> str:
    """The family a stored cell trained: cells written before ``--family`` existed are GPT-2."""
    return (cell.get("hparams") or {}).get("family", DEFAULT_FAMILY)


def gpt2_layer_parameters(d: int) -> int:
    """Parameters of one GPT-2 block of width d (biases and both LayerNorms included)."""
    return 12 * d * d + 13 * d


def llama_layer_parameters(d: int, heads: int, kv_heads: int, intermediate: int) -> int:
    """Parameters of one Llama block: q and o (d^2 each), k and v (d x d_kv each), SwiGLU's three maps, two
    RMSNorm gains; no biases (Llama's default)."""
    d_kv = d * kv_heads // heads
    return 2 * d * d + 2 * d * d_kv + 3 * d * intermediate + 2 * d


def vector_parameters(family: str, d: int) -> int:
    """A block's 1-D parameters (what a relaxed tie's offsets, ``tie_lora_vectors``, copy per tied position):
    GPT-2's two LayerNorms (weight and bias) and four biases, 13 d; Llama's two RMSNorm gains, 2 d."""
    return 13 * d if family == "gpt2" else 2 * d


def llama_intermediate_size(d: int, heads: int, kv_heads: int) -> int:
    """The SwiGLU width whose Llama block is closest in parameters to a GPT-2 block of the same width (the
    count is linear in the width, so the best is the floor or the ceiling of the exact solution)."""
    target = gpt2_layer_parameters(d)
    rest = llama_layer_parameters(d, heads, kv_heads, 0)
    low = (target - rest) // (3 * d)
    return min((low, low + 1), key=lambda i: abs(llama_layer_parameters(d, heads, kv_heads, i) - target))


def llama_shape(regime: dict[str, Any]) -> dict[str, int]:
    """The Llama block the regime gets: as many key/value heads as heads, the matched SwiGLU width."""
    d, heads = regime["embd"], regime["heads"]
    kv_heads = heads
    return {"num_key_value_heads": kv_heads, "intermediate_size": llama_intermediate_size(d, heads, kv_heads)}


def family_hparams(family: str, regime: dict[str, Any]) -> dict[str, Any]:
    """What a cell records about its family (part of its identity): the family, and for Llama its shape and
    the per-layer parameter counts of both families, so the match can be read from any cell."""
    if family == "gpt2":
        return {"family": family}
    shape = llama_shape(regime)
    d, heads = regime["embd"], regime["heads"]
    return {"family": family, **shape, "tie_word_embeddings": True,
            "layer_parameters_gpt2": gpt2_layer_parameters(d),
            "layer_parameters_llama": llama_layer_parameters(d, heads, shape["num_key_value_heads"],
                                                             shape["intermediate_size"])}


def flops_shape(family: str, regime: dict[str, Any]) -> tuple[int, int]:
    """(linear weights per layer, relaxed-delta parameters per unit of rank) for the analytic FLOPs: GPT-2
    12 d^2 and 16 d; Llama 4 d^2 + 3 d I (with d_kv = d) and 11 d + 3 I."""
    d = regime["embd"]
    if family == "gpt2":
        return 12 * d * d, 16 * d
    i = llama_shape(regime)["intermediate_size"]
    return 4 * d * d + 3 * d * i, 11 * d + 3 * i


def build_model(family: str, layers: int, regime: dict[str, Any], vocab_size: int):
    """The DynTie causal LM of ``family`` with ``layers`` layers in the regime's shape, dropout off, embeddings
    tied; built under the caller's seed (the cell sets ``torch.manual_seed`` right before)."""
    if family == "gpt2":
        from common import gpt2_config_kwargs
        from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel

        return DynTieGPT2LMHeadModel(DynTieGPT2Config(**gpt2_config_kwargs(
            layers, regime["embd"], regime["heads"], regime["seq_len"], vocab_size)))
    if family == "llama":
        from hf_dyntie import DynTieLlamaConfig, DynTieLlamaForCausalLM

        config = DynTieLlamaConfig(num_hidden_layers=layers, hidden_size=regime["embd"],
                                   num_attention_heads=regime["heads"], max_position_embeddings=regime["seq_len"],
                                   vocab_size=vocab_size, tie_word_embeddings=True, attention_dropout=0.0,
                                   **llama_shape(regime))
        return DynTieLlamaForCausalLM(config)
    raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")


def parameter_line(regime: dict[str, Any]) -> str:
    """One line for the log: the chosen SwiGLU width and both per-layer counts."""
    h = family_hparams("llama", regime)
    gpt2, llama = h["layer_parameters_gpt2"], h["layer_parameters_llama"]
    return (f"llama blocks: intermediate_size {h['intermediate_size']}, {llama:,} parameters per layer; "
            f"GPT-2 block {gpt2:,} ({llama - gpt2:+,}, {100 * (llama - gpt2) / gpt2:+.2f}%)")
