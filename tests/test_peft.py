"""PEFT adapters on a tied DynTie model: every position keeps its own LoRA tensors through ``.to()``,
``retie``, training and adapter save/load, each checked against the expanded (untied) model carrying the
same adapters; merging into a tied model is refused before any weight changes."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install hf-dyntie[peft])")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from hf_dyntie import DynTieGPT2LMHeadModel  # noqa: E402

from helpers import TIED_MAP, build, gpt2_config, input_ids, max_diff, randomize_layers, stock_copy  # noqa: E402

ATOL = 1e-5


def lora_config(**overrides) -> LoraConfig:
    fields = dict(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    fields.update(overrides)
    return LoraConfig(**fields)


def randomize_adapters(model, seed: int = 7) -> None:
    """Give every LoRA tensor its own value (``lora_B`` starts at zero, which would hide a lost delta)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def wrapped_tied(tie_map=TIED_MAP, **lora):
    model = build(DynTieGPT2LMHeadModel, gpt2_config(tie_map))
    randomize_layers(model)
    peft_model = get_peft_model(model, lora_config(**lora))
    randomize_adapters(peft_model)
    return peft_model


def expanded_twin(peft_model, **lora):
    """The stock GPT-2 computing what the tied base computes, wrapped with the same adapters."""
    base = peft_model.get_base_model()
    plain = build(DynTieGPT2LMHeadModel, gpt2_config(base.tie_map))
    state = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(state)
    stock = stock_copy(plain)
    twin = get_peft_model(stock, lora_config(**lora))
    set_peft_model_state_dict(twin, get_peft_model_state_dict(peft_model))
    return twin


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_wrapped_tied_model_equals_expanded_with_same_adapters():
    model = wrapped_tied()
    assert max_diff(logits(model), logits(expanded_twin(model))) <= ATOL


def test_to_keeps_every_positions_adapters():
    model = wrapped_tied()
    before, tensors = logits(model), lora_tensors(model)
    model.to("cpu")
    assert max_diff(logits(model), before) == 0.0
    model.to(torch.float64)
    assert all(torch.equal(p.detach().float(), tensors[n]) for n, p in lora_tensors(model).items())
    assert max_diff(logits(model), before) <= ATOL
    model.to(torch.float32)
    assert max_diff(logits(model), logits(expanded_twin(model))) <= ATOL


def test_lora_on_a_tied_position_only():
    model = wrapped_tied(layers_to_transform=[1])  # position 1 runs layer 0's weights plus its own delta
    expanded = expanded_twin(model, layers_to_transform=[1])
    assert max_diff(logits(model), logits(expanded)) <= ATOL
    model.to(torch.float64).to(torch.float32)
    assert max_diff(logits(model), logits(expanded)) <= ATOL


@pytest.mark.parametrize("new_map", [[0, 1, 2, 0, 2, 5], [0, 0, 0, 0, 0, 5]])
def test_retie_keeps_every_positions_adapters(new_map):
    model = wrapped_tied()
    tensors = lora_tensors(model)
    untie_only = all(r == i or TIED_MAP[i] == r for i, r in enumerate(new_map))
    before = logits(model)
    model.get_base_model().retie(new_map)
    assert all(torch.equal(p.detach(), tensors[n]) for n, p in lora_tensors(model).items())
    if untie_only:
        assert max_diff(logits(model), before) <= ATOL  # an untie starts from the root's weights
    assert max_diff(logits(model), logits(expanded_twin(model))) <= ATOL


def test_training_steps_with_a_device_move_equal_the_expanded_model():
    model = wrapped_tied()
    expanded = expanded_twin(model)
    ids = input_ids(seed=11)
    for m in (model, expanded):
        m.train()
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            m(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            m.to("cpu")  # the Trainer's device move between steps
        m.eval()
    assert max_diff(logits(model), logits(expanded)) <= ATOL


def test_adapter_saved_from_a_tied_model_loads_on_tied_and_expanded(tmp_path):
    model = wrapped_tied()
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model)
    fresh = build(DynTieGPT2LMHeadModel, gpt2_config(TIED_MAP))
    randomize_layers(fresh)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert max_diff(logits(reloaded), expected) <= ATOL
    randomize_source = build(DynTieGPT2LMHeadModel, gpt2_config(TIED_MAP))
    randomize_layers(randomize_source)
    stock = stock_copy(randomize_source)
    on_expanded = PeftModel.from_pretrained(stock, tmp_path / "adapter")
    assert max_diff(logits(on_expanded), expected) <= ATOL
    # ... and there merging is ordinary and preserves the function
    assert max_diff(logits(on_expanded.merge_and_unload()), expected) <= ATOL


@pytest.mark.parametrize("how", ["merge_and_unload", "safe_merge", "merge_adapter"])
def test_merge_into_a_tied_model_is_refused(how):
    model = wrapped_tied()
    before = logits(model)
    with pytest.raises(ValueError, match="hf_dyntie expand"):
        if how == "merge_adapter":
            model.merge_adapter()
        else:
            model.merge_and_unload(safe_merge=how == "safe_merge")
    assert max_diff(logits(model), before) == 0.0  # refused before any weight changed


def test_merge_into_an_untied_dyntie_model_works():
    model = wrapped_tied(tie_map=None)
    before = logits(model)
    merged = model.merge_and_unload()
    assert isinstance(merged, DynTieGPT2LMHeadModel)
    assert max_diff(logits(merged), before) <= ATOL


def test_a_wrapped_tied_model_deep_copies_and_pickles_with_its_guard():
    import copy
    import io

    model = wrapped_tied()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert max_diff(logits(clone), logits(model)) == 0.0
        with pytest.raises(ValueError, match="hf_dyntie expand"):
            clone.merge_and_unload()
