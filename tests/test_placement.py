"""device_map placement of tied models: a tie group is placed whole on one resident device, or refused in one
line before anything loads (hf_dyntie/placement.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import TIED_MAP, input_ids, max_diff
from hf_dyntie import DynTieGPT2LMHeadModel
from hf_dyntie.placement import resolve_device_map

LAYERS = "transformer.h"  # TIED_MAP = [0, 0, 2, 0, 2, 5]: groups [0, 1, 3] and [2, 4]; 5 alone


def per_layer(devices: list) -> dict:
    out = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.ln_f": 0, "lm_head": 0}
    out.update({f"{LAYERS}.{i}": d for i, d in enumerate(devices)})
    return out


@pytest.mark.parametrize("devices, problem", [
    ([0, 1, 0, 0, 0, 0], r"splits tie group \[0, 1, 3\] across devices \['0', '1'\]"),
    ([0, 0, 0, 0, "disk", 0], r"offloads tie group \[2, 4\] to disk"),
    ([0, 0, "cpu", 0, "cpu", 0], r"offloads tie group \[2, 4\] to the CPU"),
])
def test_a_map_that_splits_or_offloads_a_group_is_refused(devices, problem):
    with pytest.raises(ValueError, match=problem) as error:
        resolve_device_map(per_layer(devices), LAYERS, TIED_MAP)
    assert "expand" in str(error.value) and "\n" not in str(error.value)


def test_a_submodule_key_deeper_than_the_layer_counts():
    device_map = {**per_layer([0] * 6), f"{LAYERS}.4.mlp": 1}
    with pytest.raises(ValueError, match=r"\[2, 4\] across devices"):
        resolve_device_map(device_map, LAYERS, TIED_MAP)


def test_whole_groups_on_one_device_and_untied_positions_anywhere_pass():
    ok = per_layer([0, 0, 1, 0, 1, "cpu"])  # each group on one accelerator; untied position 5 offloaded
    assert resolve_device_map(ok, LAYERS, TIED_MAP) == ok
    assert resolve_device_map({"": "cpu"}, LAYERS, TIED_MAP) == {"": "cpu"}  # all on the CPU: no offload
    assert resolve_device_map({"transformer": "cpu", "lm_head": "cpu"}, LAYERS, TIED_MAP)
    untied = per_layer([0, "disk", 1, "cpu", 0, 1])
    assert resolve_device_map(untied, LAYERS, list(range(6))) == untied  # nothing tied: placed freely
    assert resolve_device_map("cuda:1", LAYERS, TIED_MAP) == "cuda:1"  # one device


def test_a_strategy_string_becomes_the_one_device_or_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_map("auto", LAYERS, TIED_MAP) == {"": "cpu"}
    with pytest.raises(ValueError, match="may split or offload"):
        resolve_device_map("auto", LAYERS, TIED_MAP, offload_kwargs=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device_map='balanced' may split"):
        resolve_device_map("balanced", LAYERS, TIED_MAP)
    assert resolve_device_map("auto", LAYERS, list(range(6))) == "auto"  # untied: accelerate decides


@pytest.fixture()
def saved(tied_gpt2, tmp_path):
    tied_gpt2.eval()
    tied_gpt2.save_pretrained(tmp_path / "tied")
    return tied_gpt2, tmp_path / "tied"


def test_from_pretrained_refuses_before_loading(saved):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")  # loading it would fail differently
    with pytest.raises(ValueError, match=r"offloads tie group \[0, 1, 3\] to disk.*expand"):
        DynTieGPT2LMHeadModel.from_pretrained(folder, device_map={"": "cpu", f"{LAYERS}.1": "disk"},
                                              offload_folder=str(folder / "offload"))


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"])
def test_from_pretrained_with_a_one_device_map_restores_sharing_and_logits(saved, device_map):
    model, folder = saved
    loaded = DynTieGPT2LMHeadModel.from_pretrained(folder, device_map=device_map).eval()
    assert loaded.tie_map == model.tie_map
    h = loaded.transformer.h
    assert h[3].attn.c_attn.weight.data_ptr() == h[0].attn.c_attn.weight.data_ptr()
    assert h[4].mlp.c_fc.weight.data_ptr() == h[2].mlp.c_fc.weight.data_ptr()
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, model(ids).logits) < 1e-6


@pytest.mark.parametrize("relaxed", [0, 2], ids=["plain", "relaxed"])
def test_accelerate_offload_of_a_tied_model_gives_its_logits(tmp_path, relaxed):
    """accelerate.cpu_offload / disk_offload keep every weight on meta until its module's hook loads it: a tied leaf
    runs inside its root leaf's hook, so a live tied model and its compact reload compute what they did."""
    import copy

    from accelerate import cpu_offload, disk_offload

    from helpers import make_case

    model = make_case("gpt2-lm", tie_lora_rank=relaxed)
    if relaxed:  # deltas that are not zero, so a tied position differs from its root
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "tie_delta" in name:
                    p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "compact")
    x = input_ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        for i, offload in enumerate((cpu_offload, disk_offload)):
            for source in (copy.deepcopy(model), DynTieGPT2LMHeadModel.from_pretrained(tmp_path / "compact").eval()):
                if offload is cpu_offload:
                    offload(source, execution_device=torch.device("cpu"))
                else:
                    offload(source, str(tmp_path / f"disk{i}"), execution_device=torch.device("cpu"))
                assert max_diff(source(input_ids=x).logits, expected) < 1e-5
