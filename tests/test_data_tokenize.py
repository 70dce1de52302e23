"""Tokenisation: response-only labels, truncation, collate padding, deterministic loaders."""

from __future__ import annotations

from itertools import chain

import pytest
import torch

from fedsecure.data import DataError, collate, encode_dataset, encode_example, make_loader, private_records
from fedsecure.models.catalog import load_tokenizer
from fedsecure.models.loss import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def examples():
    ds = private_records(
        num_clients=2, examples_per_client=12, num_eval=0, num_nonmembers=0, seed=4, record_kind="customer"
    )
    return [e for c in ds.clients for e in c]


def test_labels_exactly_the_response(tok, examples):
    for ex in examples:
        f = encode_example(tok, ex, max_length=1024)
        ids, labels = f["input_ids"], f["labels"]
        assert len(ids) == len(labels) == len(f["attention_mask"])
        sup = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
        assert sup == list(range(sup[0], sup[-1] + 1))  # one contiguous span
        assert all(labels[i] == ids[i] for i in sup)
        assert tok.decode([ids[i] for i in sup]) == ex["response"] + "<|im_end|>"
        # Everything before the span is the templated prompt, ending with the assistant header.
        assert tok.decode(ids[: sup[0]]).endswith(f"{ex['prompt']}<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(ids[: sup[0]]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
        assert tok.decode(ids[sup[-1] + 1 :]) == "\n"  # template's trailing newline is unsupervised


def test_system_prompt_option(tok, examples):
    ex = examples[0]
    short = encode_example(tok, ex, max_length=1024)
    custom = encode_example(tok, ex, max_length=1024, system_prompt="Answer briefly and precisely, please.")
    assert "Answer briefly" in tok.decode(custom["input_ids"])
    sup = lambda f: [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE_INDEX]  # noqa: E731
    assert sup(short) == sup(custom)


def test_truncation_keeps_supervision_or_raises(tok, examples):
    ex = examples[0]
    full = encode_example(tok, ex, max_length=1024)
    n_prompt = full["labels"].index(next(lab for lab in full["labels"] if lab != IGNORE_INDEX))
    cut = encode_example(tok, ex, max_length=n_prompt + 1)
    assert len(cut["input_ids"]) == n_prompt + 1
    assert sum(lab != IGNORE_INDEX for lab in cut["labels"]) == 1
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 1]
    with pytest.raises(DataError, match=rf"{ex['id']}.*max_length={n_prompt}"):
        encode_example(tok, ex, max_length=n_prompt)


def test_no_template_fallback(examples):
    tok = load_tokenizer("tiny")
    tok.chat_template = None
    f = encode_example(tok, examples[0], max_length=1024)
    sup = [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(sup) == examples[0]["response"] + tok.eos_token


def test_collate_right_pads(tok):
    feats = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    b = collate(feats, pad_token_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())
    with pytest.raises(DataError, match="different lengths"):
        collate([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1]}], pad_token_id=0)


def _batches(loader):
    return [b["input_ids"][:, 0].tolist() for b in loader]


def test_loader_num_steps_and_epochs():
    feats = [{"input_ids": [i, 1], "attention_mask": [1, 1], "labels": [-100, 1]} for i in range(10)]
    dl = make_loader(feats, batch_size=4, seed=3, num_steps=7, pad_token_id=0)
    got = _batches(dl)
    assert len(got) == len(dl) == 7 and all(len(b) == 4 for b in got)
    assert all(len(set(b)) == 4 for b in got)  # no repeat inside a batch
    stream = [i for b in got for i in b]
    assert sorted(stream[:10]) == list(range(10))  # first pass is a permutation
    assert sorted(stream[10:20]) == list(range(10))  # and so is the second
    assert got == _batches(make_loader(feats, batch_size=4, seed=3, num_steps=7, pad_token_id=0))
    assert got != _batches(make_loader(feats, batch_size=4, seed=4, num_steps=7, pad_token_id=0))
    ep = _batches(make_loader(feats, batch_size=4, seed=3, epochs=2, pad_token_id=0))
    assert [len(b) for b in ep] == [4, 4, 2, 4, 4, 2]
    assert sorted(chain(*ep[:3])) == list(range(10)) and sorted(chain(*ep[3:])) == list(range(10))
    small = _batches(make_loader(feats[:3], batch_size=8, seed=0, num_steps=3, pad_token_id=0))
    assert all(sorted(b) == [0, 1, 2] for b in small)  # batch capped at dataset size, no duplicates
    with pytest.raises(DataError, match="exactly one of num_steps or epochs"):
        make_loader(feats, batch_size=2, seed=0, pad_token_id=0)
    with pytest.raises(DataError, match="batch_size"):
        make_loader(feats, batch_size=0, seed=0, num_steps=1, pad_token_id=0)


def test_end_to_end_loss_on_tiny_model(tok, examples):
    from fedsecure.models import load_model
    from fedsecure.models.loss import per_sequence_loss

    model, _ = load_model("tiny")
    feats = encode_dataset(tok, examples[:4], max_length=256)
    batch = next(iter(make_loader(feats, batch_size=4, seed=0, num_steps=1, pad_token_id=tok.pad_token_id)))
    with torch.no_grad():
        loss = per_sequence_loss(model, batch)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    # Random init: loss near log(vocab) per supervised token.
    assert abs(loss.mean().item() - torch.log(torch.tensor(float(len(tok)))).item()) < 1.0
