"""Models: adapter <-> flat vector exactness, PEFT-format save/load, untrusted files refused."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsecure.models import (
    LoraSettings,
    attach_lora,
    flatten_adapter,
    get_adapter_state,
    load_adapter_file,
    load_model,
    save_adapter,
    set_adapter_state,
    unflatten_adapter,
)


@pytest.fixture(scope="module")
def tiny_lora():
    model, tok = load_model("tiny")
    torch.manual_seed(0)
    return attach_lora(model, LoraSettings(rank=4, target_modules="all-linear")), tok


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 7)), min_size=1, max_size=6), st.integers(0, 2**31))
def test_flatten_roundtrip_is_exact(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    state = {f"layer{i}.w": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}
    vec, spec = flatten_adapter(state)
    assert vec.numel() == sum(a * b for a, b in shapes)
    back = unflatten_adapter(vec, spec)
    assert list(back) == list(state)
    for k in state:
        assert torch.equal(back[k], state[k])
    with pytest.raises(ValueError, match="spec expects"):
        unflatten_adapter(vec[:-1], spec)


def test_adapter_state_is_trainable_only_and_stable(tiny_lora):
    model, _ = tiny_lora
    state = get_adapter_state(model)
    assert state and all("lora_" in k for k in state)
    assert list(state) == sorted(state)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    new = {k: torch.randn_like(v) for k, v in state.items()}
    set_adapter_state(model, new)
    got = get_adapter_state(model)
    assert all(torch.equal(got[k], new[k]) for k in new)
    with pytest.raises(ValueError, match="does not match"):
        set_adapter_state(model, {**new, "extra.weight": torch.zeros(1)})
    k0 = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(model, {**new, k0: torch.zeros(1, 1)})


def test_saved_adapter_is_read_by_peft(tiny_lora, tmp_path):
    from peft import PeftModel

    model, _ = tiny_lora
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    save_adapter(model, tmp_path, state=state)
    assert (tmp_path / "adapter_model.safetensors").exists()
    base, _ = load_model("tiny")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path))
    got = get_adapter_state(reloaded)
    assert all(torch.equal(got[k], state[k]) for k in state)
    ours = load_adapter_file(tmp_path)
    assert all(torch.equal(ours[k], state[k]) for k in state)


def test_pickled_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match="only from safetensors"):
        load_adapter_file(tmp_path)
    fake = tmp_path / "adapter_model.safetensors"
    fake.write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match="not a"):
        load_adapter_file(fake)


def test_lora_on_embeddings_is_refused():
    with pytest.raises(ValueError, match="embeddings"):
        LoraSettings(target_modules=("embed_tokens",))


@pytest.mark.slow
def test_smollm2_generates_a_sensible_answer():
    model, tok = load_model("smollm2-135m")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
