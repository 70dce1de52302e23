"""End-to-end federation on the tiny model: learning, FedAvg equivalence, resume, bad updates."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from fedsecure.experiment import CompatibilityError, Experiment, Results
from fedsecure.models import load_adapter_file


def test_loss_goes_down_over_rounds(tiny_config, tmp_path):
    cfg = tiny_config(**{"federation.rounds": 3, "federation.lr": 1e-2})
    res = Experiment(cfg).run(out_dir=tmp_path)
    losses = [res.utility["eval_loss_initial"], *res.utility["eval_loss_by_round"]]
    assert len(losses) == 4
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    # results directory contents and JSON round trip
    for name in ("config.toml", "metrics.jsonl", "results.json", "summary.md", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).exists(), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    again = Results.load(tmp_path)
    assert again.to_dict() == json.loads(res.to_json())
    assert res.cost["bytes_up_per_client_per_round"] == res.federation["adapter_parameters"] * 4
    assert res.cost["peak_rss_mb"] > 0
    assert set(res.utility["eval_loss_by_client"]) <= {"0", "1"}


def test_fedavg_of_identical_clients_equals_one_client(tiny_config):
    """Two clients with the same data (full-batch steps) aggregate to one client's update."""
    from fedsecure.federation.client import run_client
    from fedsecure.federation.simulation import SimulationEngine
    from fedsecure.models import get_adapter_state

    cfg = tiny_config(**{"federation.rounds": 1, "federation.batch_size": 12, "data.num_clients": 1})
    exp = Experiment(cfg)
    # build model/data through a 1-client run, then reuse its parts
    exp.run()
    model, tok, ds = exp.model, exp.tokenizer, exp.dataset
    from fedsecure.data.tokenize import encode_dataset

    feats = encode_dataset(tok, list(ds.clients[0]), max_length=64)[:12]
    start = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in get_adapter_state(model).items()}
    from fedsecure.types import RoundContext, adapter_hash

    ctx = RoundContext(round=0, num_rounds=1, sampled_clients=(0,), num_clients=1, seed=0,
                       global_hash=adapter_hash(start))
    one = run_client(model=model, global_state=start, announced_hash=ctx.global_hash, features=feats, num_examples=12,
                     fed=cfg.federation, defenses=[], ctx=ctx, client_id=0, pad_token_id=tok.pad_token_id)
    eng = SimulationEngine(
        config=cfg, model=model, tokenizer=tok, client_features=[feats, feats], client_num_examples={0: 12, 1: 12},
        eval_features=feats[:2], eval_groups=None, client_groups={}, transport=exp.transport,
        aggregator=exp.aggregator, defenses=[], observers=[], ground_truth={}, out_dir=None,
    )
    final = eng.run(global_state=start)
    for k in start:
        expected = start[k] + one.update.delta[k]
        assert torch.allclose(final[k], expected, atol=2e-6), k
    assert any(float(one.update.delta[k].abs().max()) > 0 for k in start)


def test_resume_gives_the_same_adapter(tiny_config, tmp_path):
    cfg = tiny_config(**{"federation.rounds": 3})
    Experiment(cfg).run(out_dir=tmp_path / "full")

    crashed = Experiment(cfg)

    def crash(update, ctx):
        if ctx.round == 2:
            raise KeyboardInterrupt("simulated crash")
        return update

    crashed.client_hook = crash
    with pytest.raises(KeyboardInterrupt):
        crashed.run(out_dir=tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoints" / "round_0001").exists()
    resumed = Experiment(cfg).run(out_dir=tmp_path / "resumed", resume=True)
    a = load_adapter_file(tmp_path / "full" / "adapter")
    b = load_adapter_file(tmp_path / "resumed" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2]
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2]


@pytest.mark.parametrize("fault", ["nan", "inf", "shape", "keys"])
def test_bad_client_update_is_rejected_and_run_goes_on(tiny_config, fault):
    import dataclasses

    cfg = tiny_config(**{"federation.rounds": 2})
    exp = Experiment(cfg)

    def corrupt(update, ctx):
        if update.client_id != 1 or ctx.round != 0:
            return update
        delta = dict(update.delta)
        k = next(iter(delta))
        if fault == "nan":
            delta[k] = delta[k].clone().fill_(float("nan"))
        elif fault == "inf":
            delta[k] = delta[k].clone().fill_(float("inf"))
        elif fault == "shape":
            delta[k] = torch.zeros(3, 3)
        else:
            delta["not.a.key"] = delta.pop(k)
        return dataclasses.replace(update, delta=delta)

    exp.client_hook = corrupt
    res = exp.run()
    rej = res.federation["rejected_updates"]
    assert len(rej) == 1 and rej[0]["client_id"] == 1 and rej[0]["round"] == 0
    assert res.rounds[0]["aggregated"] == [0]
    assert res.rounds[1]["aggregated"] == [0, 1]
    assert all(torch.isfinite(torch.tensor(x)) for x in res.utility["eval_loss_by_round"])


def test_dropouts_are_tolerated_and_recorded(tiny_config):
    cfg = tiny_config(**{"data.num_clients": 4, "federation.dropout_rate": 0.5, "federation.rounds": 1})
    res = Experiment(cfg).run()
    r0 = res.rounds[0]
    assert len(r0["dropped"]) == 2
    assert sorted(r0["aggregated"] + r0["dropped"]) == r0["sampled"]


def test_client_sampling_counts(tiny_config):
    cfg = tiny_config(**{"data.num_clients": 4, "federation.clients_per_round": 2, "federation.rounds": 2})
    res = Experiment(cfg).run()
    for r in res.rounds:
        assert len(r["sampled"]) == 2


def test_incompatible_parts_are_reported_together(tiny_config):
    from fedsecure.federation.transport import PlainTransport
    from fedsecure.registry import TRANSPORTS
    from fedsecure.types import View

    @TRANSPORTS.register("test-sealed")
    class Sealed(PlainTransport):
        name = "test-sealed"
        exposes = frozenset({View.SERVER_AGGREGATE})

    cfg = tiny_config(transport={"name": "test-sealed"}, aggregator={"name": "krum"},
                      defenses=[])
    with pytest.raises(CompatibilityError) as err:
        Experiment(cfg)
    msg = str(err.value)
    assert "krum" in msg and "per-client" in msg and "fedavg" in msg


def test_fedprox_runs_and_differs(tiny_config):
    a = Experiment(tiny_config(**{"federation.rounds": 1})).run()
    b = Experiment(tiny_config(**{"federation.rounds": 1, "federation.proximal_mu": 10.0})).run()
    assert a.utility["eval_loss"] != b.utility["eval_loss"]


def test_server_sending_different_models_is_detected(tiny_config):
    from fedsecure.federation.client import ModelMismatchError, run_client
    from fedsecure.types import RoundContext

    exp = Experiment(tiny_config())
    exp.run()
    from fedsecure.models import get_adapter_state

    state = get_adapter_state(exp.model)
    ctx = RoundContext(round=0, num_rounds=1, sampled_clients=(0,), num_clients=1, seed=0, global_hash="ab" * 32)
    with pytest.raises(ModelMismatchError, match="different model"):
        run_client(model=exp.model, global_state=state, announced_hash=ctx.global_hash, features=[], num_examples=1,
                   fed=exp.config.federation, defenses=[], ctx=ctx, client_id=0, pad_token_id=0)
