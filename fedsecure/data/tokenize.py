"""Tokenisation for supervised fine-tuning: chat template, response-only labels, batching.

An example becomes ``system / user / assistant`` messages rendered with the tokenizer's chat
template. Labels are ``-100`` (:data:`fedsecure.models.loss.IGNORE_INDEX`) on every token
except the assistant response and its end-of-turn token, so the loss, DP-SGD's per-sample
gradients and membership scores all measure the response given the prompt -- the part a
memorisation attack extracts (Carlini et al., "Extracting Training Data from Large Language
Models", USENIX Security 2021).

Tokenizers without a chat template get a plain ``"User: ...\\nAssistant: "`` format closed
by the EOS token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from fedsecure.data.base import DataError, Example
from fedsecure.models.loss import IGNORE_INDEX

DEFAULT_SYSTEM = "You are a helpful assistant."
"""Short system prompt (SmolLM2's template would otherwise inject a longer one)."""

Features = dict[str, list[int]]


def _messages(example: Example, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = []
    if system_prompt is not None:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user", "content": example["prompt"]})
    return msgs


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, example: Example, system_prompt: str | None) -> tuple[list[int], list[int]]:
    """Token ids of (prompt part incl. assistant header, whole conversation)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = _messages(example, system_prompt)
        prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            [*msgs, {"role": "assistant", "content": example["response"]}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise DataError(
                "the tokenizer's chat template does not render the conversation as prompt + response; "
                "response-only labels cannot be placed"
            )
        prompt_ids = _ids(tokenizer, prompt_text)
        # Tokenise the response separately so BPE merges never cross the prompt/response boundary.
        return prompt_ids, prompt_ids + _ids(tokenizer, full_text[len(prompt_text) :])
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has neither a chat template nor an EOS token; cannot mark end of response")
    head = f"{system_prompt}\n\n" if system_prompt else ""
    prompt_text = f"{head}User: {example['prompt']}\nAssistant: "
    prompt_ids = _ids(tokenizer, prompt_text)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + prompt_ids, bos + prompt_ids + _ids(tokenizer, example["response"]) + [tokenizer.eos_token_id]


def _supervised_end(tokenizer: Any, completion: list[int]) -> int:
    """Number of leading completion tokens to supervise: through the last end-of-turn token."""
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t is not None}
    stops.discard(getattr(tokenizer, "unk_token_id", None))
    for j in range(len(completion) - 1, -1, -1):
        if completion[j] in stops:
            return j + 1
    # No end-of-turn token: drop trailing whitespace-only tokens the template appends.
    end = len(completion)
    while end > 1 and not tokenizer.decode(completion[end - 1 : end]).strip():
        end -= 1
    return end


def encode_example(
    tokenizer: Any, example: Example, *, max_length: int, system_prompt: str | None = DEFAULT_SYSTEM
) -> Features:
    """Tokenise one example with response-only labels.

    Parameters
    ----------
    tokenizer:
        A Hugging Face tokenizer (chat template used when present).
    example:
        Mapping with ``"prompt"``, ``"response"`` and ``"id"``.
    max_length:
        Maximum sequence length in tokens; longer sequences are cut on the right (the end of
        the response goes first).
    system_prompt:
        System message (``None``: no system message; note SmolLM2's template then inserts its
        own default one).

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask`` and ``labels`` (equal length; labels ``-100``
        outside the response and its end-of-turn token).

    Raises
    ------
    DataError
        If truncation to ``max_length`` would leave no supervised token.
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    for key in ("prompt", "response"):
        if not isinstance(example.get(key), str):
            raise DataError(f"example {example.get('id')!r}: field {key!r} must be a string")
    if not example["response"]:
        raise DataError(f"example {example.get('id')!r}: empty response, nothing to supervise")
    prompt_ids, full_ids = _render(tokenizer, example, system_prompt)
    n_prompt = len(prompt_ids)
    n_sup = _supervised_end(tokenizer, full_ids[n_prompt:])
    labels = [IGNORE_INDEX] * n_prompt + full_ids[n_prompt : n_prompt + n_sup]
    labels += [IGNORE_INDEX] * (len(full_ids) - len(labels))
    if n_prompt >= max_length:
        raise DataError(
            f"example {example.get('id')!r}: the prompt alone is {n_prompt} tokens, so max_length={max_length} "
            "leaves no response token to train on; raise max_length or shorten the prompt/system prompt"
        )
    input_ids = full_ids[:max_length]
    labels = labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_dataset(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_length: int,
    system_prompt: str | None = DEFAULT_SYSTEM,
) -> list[Features]:
    """:func:`encode_example` over ``examples`` (order kept)."""
    return [encode_example(tokenizer, ex, max_length=max_length, system_prompt=system_prompt) for ex in examples]


def collate(features: Sequence[Features], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad features into ``input_ids``, ``attention_mask``, ``labels`` (pad label -100)."""
    if not features:
        raise DataError("collate: empty batch")
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n or len(f.get("attention_mask", f["input_ids"])) != n:
            raise DataError(f"collate: feature {row} has input_ids/labels/attention_mask of different lengths")
        ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[row, :n] = torch.tensor(f.get("attention_mask", [1] * n), dtype=torch.long)
        labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ShuffledBatchSampler(Sampler[list[int]]):
    """Deterministic batches of indices.

    ``num_steps`` mode: exactly ``num_steps`` batches of ``min(batch_size, n)`` distinct
    indices, read from a stream of fresh permutations (a batch that spans two permutations
    never repeats an index; a deferred index starts the next batch). ``epochs`` mode: each
    epoch one permutation cut into batches of ``batch_size`` (the last may be smaller).
    Iterating twice yields the same batches.
    """

    def __init__(self, n_items: int, *, batch_size: int, seed: int, num_steps: int | None, epochs: int | None):
        if n_items < 1:
            raise DataError("make_loader: no features to load (a client with no training examples?)")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if (num_steps is None) == (epochs is None):
            raise DataError("make_loader: pass exactly one of num_steps or epochs")
        if num_steps is not None and num_steps < 1:
            raise DataError(f"num_steps must be >= 1, got {num_steps}")
        if epochs is not None and epochs < 1:
            raise DataError(f"epochs must be >= 1, got {epochs}")
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.num_steps = num_steps
        self.epochs = epochs

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed)
        n, b = self.n_items, self.batch_size
        if self.epochs is not None:
            out = []
            for _ in range(self.epochs):
                perm = [int(i) for i in rng.permutation(n)]
                out.extend(perm[s : s + b] for s in range(0, n, b))
            return out
        b = min(b, n)
        out = []
        pending: list[int] = []
        assert self.num_steps is not None
        for _ in range(self.num_steps):
            batch: list[int] = []
            deferred: list[int] = []
            while len(batch) < b:
                if not pending:
                    pending = [int(i) for i in rng.permutation(n)]
                i = pending.pop(0)
                (deferred if i in batch else batch).append(i)
            pending = deferred + pending
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        if self.num_steps is not None:
            return self.num_steps
        assert self.epochs is not None
        return self.epochs * -(-self.n_items // self.batch_size)


def make_loader(
    features: Sequence[Features],
    *,
    batch_size: int,
    seed: int,
    num_steps: int | None = None,
    epochs: int | None = None,
    pad_token_id: int,
) -> DataLoader:
    """A deterministic :class:`~torch.utils.data.DataLoader` of collated batches.

    Parameters
    ----------
    features:
        Encoded examples (:func:`encode_dataset`).
    batch_size:
        Logical batch size (capped at ``len(features)`` in ``num_steps`` mode).
    seed:
        Shuffling seed; the same seed gives the same batches.
    num_steps:
        Exactly this many batches, sampled without replacement within each reshuffle.
    epochs:
        This many plain shuffled passes (the last batch of an epoch may be smaller).
    pad_token_id:
        Padding id for ``input_ids``.

    Exactly one of ``num_steps`` and ``epochs`` must be given.
    """
    sampler = ShuffledBatchSampler(len(features), batch_size=batch_size, seed=seed, num_steps=num_steps, epochs=epochs)
    return DataLoader(
        list(features),
        batch_sampler=sampler,
        collate_fn=partial(collate, pad_token_id=pad_token_id),
        num_workers=0,
    )
