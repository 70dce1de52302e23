"""``fedsecure audit`` on adapters saved by plain peft, and base/adapter mismatches."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from fedsecure.attacks.audit import (
    AdapterMismatchError,
    audit_main,
    read_canaries,
    read_examples,
    run_audit,
)
from fedsecure.data import DataError

MAX_LEN = 48


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _peft_adapter(model, directory, *, seed=0, target_modules=("q_proj", "v_proj")):
    """An adapter made with peft's own API (not fedsecure's), B randomised so it matters."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules),
                                                  task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(directory))
    return peft_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fedsecure.data import private_records
    from fedsecure.models import load_model

    root = tmp_path_factory.mktemp("audit")
    model, tok = load_model("tiny")
    base_dir = root / "base"
    model.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    _peft_adapter(model, root / "adapter")
    ds = private_records(num_clients=1, examples_per_client=10, num_eval=2, num_nonmembers=10,
                         canary_repetitions=(4,), seed=0)
    members = [{"prompt": e["prompt"], "response": e["response"]} for e in ds.members()]
    _write_jsonl(root / "members.jsonl", members)
    with open(root / "nonmembers.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        w.writeheader()
        for e in ds.nonmembers:
            w.writerow({"prompt": e["prompt"], "response": e["response"]})
    _write_jsonl(root / "canaries.jsonl", [
        {"canary_id": c.canary_id, "prompt": c.prompt, "prefix": c.prefix, "secret": c.secret,
         "alphabet": c.alphabet, "repetitions": c.repetitions} for c in ds.canaries])
    return root, members


def test_audit_of_a_plain_peft_adapter(files, capsys):
    from peft import PeftModel

    from fedsecure.attacks.scoring import compute_token_stats
    from fedsecure.models import load_model

    root, members = files
    out = root / "report"
    rc = audit_main(["--base", str(root / "base"), "--adapter", str(root / "adapter"),
                     "--members", str(root / "members.jsonl"), "--nonmembers", str(root / "nonmembers.csv"),
                     "--canaries", str(root / "canaries.jsonl"), "--num-candidates", "20",
                     "--max-length", str(MAX_LEN), "--out", str(out), "--epsilon", "4"])
    assert rc == 0, capsys.readouterr().err
    audit = json.loads((out / "audit.json").read_text())
    names = [a["name"] for a in audit["attacks"]]
    assert names == ["loss", "zlib", "min-k", "min-k++", "reference-base", "canary-exposure"]
    for a in audit["attacks"]:
        assert a["applicable"], a
        m = a["metrics"]
        assert 0.0 <= m["auc"] <= 1.0 and len(m["auc_ci"]) == 2
        assert set(m["tpr_at_fpr"]) == {"0.01", "0.001", "0.0"}
        assert m["epsilon"] == 4.0 and m["epsilon_lower_bound"] >= 0.0
    canary = audit["attacks"][-1]["metrics"]
    assert set(canary["exposure_by_repetition"]) == {"0", "4"}
    assert audit["num_members"] == 10 and audit["num_nonmembers"] == 10 and audit["num_canaries"] == 2
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| loss | yes |" in md and "Canary exposure" in md and "roc.png" in md
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html and "reference-base" in html
    # Oracle: the audit's LOSS scores equal those of the adapter loaded by peft itself.
    base, tok = load_model(str(root / "base"))
    ref_model = PeftModel.from_pretrained(base, str(root / "adapter")).eval()
    expected = [s.mean_logprob for s in compute_token_stats(ref_model, tok, members, max_length=MAX_LEN)]
    np.testing.assert_allclose(audit["attacks"][0]["details"]["scores_members"], expected, atol=1e-5)
    with torch.no_grad():  # and the adapter is not a no-op
        base2, _ = load_model(str(root / "base"))
        plain = [s.mean_logprob for s in compute_token_stats(base2, tok, members, max_length=MAX_LEN)]
    assert not np.allclose(plain, expected, atol=1e-4)


def test_adapter_for_a_different_hidden_size_is_refused(files, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsecure.models.catalog import TINY_CONFIG

    root, members = files
    cfg = LlamaConfig(vocab_size=49152, **{**TINY_CONFIG, "hidden_size": 128, "head_dim": 32})
    _peft_adapter(LlamaForCausalLM(cfg), tmp_path / "wide")
    with pytest.raises(AdapterMismatchError, match=r"expects input size 128 .* has 64"):
        run_audit(base=str(root / "base"), adapter_dir=tmp_path / "wide", members=members[:3],
                  nonmembers=[{"prompt": "x", "response": "y"}], out_dir=tmp_path / "o")
    rc = audit_main(["--base", "tiny", "--adapter", str(tmp_path / "wide"), "--members",
                     str(root / "members.jsonl"), "--nonmembers", str(root / "nonmembers.csv"),
                     "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "different size" in err and "hidden size" in err
    assert not (tmp_path / "o2").exists()


def test_adapter_targeting_missing_modules_is_refused(files, tmp_path):
    root, members = files
    bad = tmp_path / "gpt2-style"
    shutil.copytree(root / "adapter", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn", "c_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match=r"\['c_attn', 'c_proj'\].*q_proj"):
        run_audit(base="tiny", adapter_dir=bad, members=members[:3],
                  nonmembers=[{"prompt": "x", "response": "y"}], out_dir=tmp_path / "o")


def test_pickled_adapter_is_refused(files, tmp_path):
    root, members = files
    bad = tmp_path / "bin-only"
    bad.mkdir()
    shutil.copy(root / "adapter" / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="safetensors"):
        run_audit(base="tiny", adapter_dir=bad, members=members[:3],
                  nonmembers=[{"prompt": "x", "response": "y"}], out_dir=tmp_path / "o")


def test_input_files(tmp_path, files):
    root, members = files
    text = _write_jsonl(tmp_path / "t.jsonl", [{"text": "Patient Ann Lee, MRN-1"}, {"text": "Bob"}])
    assert read_examples(text) == [
        {"prompt": "", "response": "Patient Ann Lee, MRN-1", "id": "examples-0"},
        {"prompt": "", "response": "Bob", "id": "examples-1"},
    ]
    got = read_examples(root / "nonmembers.csv")
    assert len(got) == 10 and all(e["prompt"] and e["response"] for e in got)
    with pytest.raises(DataError, match="'text' column"):
        read_examples(_write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}]))
    canaries = read_canaries(root / "canaries.jsonl")
    assert sorted(c.repetitions for c in canaries) == [0, 4]
    assert all(c.length == len(c.secret) for c in canaries)
    with pytest.raises(DataError, match="both in members and non-members"):
        run_audit(base="tiny", adapter_dir=root / "adapter", members=members, nonmembers=members[:1],
                  out_dir=tmp_path / "o")
