"""Flower engine, in process: the real ServerApp engine and ClientApp handlers over a loopback Grid.

The loopback Grid hands every message to ``fedsecure.engines.flower.apps.client_app`` with the
SuperNode's own ``Context`` (whose ``state`` persists between messages, as on a SuperNode) and
can make a SuperNode die at a chosen message (Flower's NODE_UNAVAILABLE reply). The same
checks with real SuperLink/SuperNode processes are in ``test_flower_deployment.py``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedsecure.config import config_from_dict
from fedsecure.engines.flower import protocol as P
from fedsecure.engines.flower.apps import client_app
from fedsecure.engines.flower.engine import (
    FlowerEngine,
    FlowerEngineError,
    Messenger,
    RemoteClientError,
    ServerOptions,
    flower_conflicts,
)
from fedsecure.experiment import CompatibilityError, Experiment
from fedsecure.report.toml_writer import dumps
from tests.conftest import tiny_tree


# ---- a loopback Grid ------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _serverapp_identity():
    """Flower stamps instruction messages with the identity of the ServerApp task running them."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LoopbackGrid(Grid):
    """Delivers messages to the ClientApp in this process; ``die`` makes a node vanish at a message type."""

    def __init__(self, node_configs: dict[int, dict[str, Any]], run_config: dict[str, Any]) -> None:
        self.contexts = {
            n: Context(
                run_id=7, node_id=n, node_config=dict(c), state=RecordDict(), run_config=dict(run_config)
            )
            for n, c in node_configs.items()
        }
        self.inbox: dict[str, Message] = {}
        self.dead: set[int] = set()
        self.die: dict[int, str] = {}
        self.log: list[tuple[int, str]] = []

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dead]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            msg = self.inbox.pop(mid, None)
            if msg is None:
                continue
            node, mtype = msg.metadata.dst_node_id, msg.metadata.message_type
            self.log.append((node, mtype))
            if self.die.get(node) == mtype:
                self.dead.add(node)
            if node in self.dead:
                out.append(Message(Error(code=5, reason="node unavailable"), reply_to=msg))
                continue
            try:
                out.append(client_app(msg, self.contexts[node]))
            except Exception as err:  # the ClientApp process would report it as error code 2
                out.append(Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg))
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _cfg(**over: Any):
    small = {
        "federation.rounds": 1,
        "federation.local_steps": 1,
        "data.examples_per_client": 8,
        "data.num_eval": 4,
        "data.num_nonmembers": 4,
    }
    tree = tiny_tree(**{**small, **over})
    return config_from_dict(tree)


def _flower_run(cfg, node_configs: dict[int, dict[str, Any]], *, die: dict[int, str] | None = None):
    grid = LoopbackGrid(node_configs, {P.RC_SCENARIO: dumps(cfg.to_dict())})
    grid.die.update(die or {})
    exp = Experiment(cfg)
    assert flower_conflicts(exp) == []
    engines: list[FlowerEngine] = []

    def factory(**kw: Any) -> FlowerEngine:
        engines.append(
            FlowerEngine(grid=grid, options=ServerOptions(discovery_timeout_s=5, stage_timeout_s=5), **kw)
        )
        return engines[0]

    exp.engine_factory = factory
    return exp.run(), exp, engines[0], grid


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---- node configuration -----------------------------------------------------------------------
def test_node_config_forms_and_errors():
    assert P.parse_node_config({"client-ids": "3, 0"}, num_clients=4).client_ids == (0, 3)
    assert P.parse_node_config({"client-ids": 2}, num_clients=4).client_ids == (2,)
    assert P.parse_node_config({"partition-id": 1, "num-partitions": 3}, num_clients=8).client_ids == (
        1,
        4,
        7,
    )
    kh = P.parse_node_config({"role": "key-holder"}, num_clients=0)
    assert kh.role == "key-holder" and kh.client_ids == ()
    with pytest.raises(P.NodeConfigError, match="does not say which clients"):
        P.parse_node_config({}, num_clients=4)
    with pytest.raises(P.NodeConfigError, match=r"clients \[9\].*0\.\.3"):
        P.parse_node_config({"client-ids": "1,9"}, num_clients=4)
    with pytest.raises(P.NodeConfigError, match="partition-id < num-partitions"):
        P.parse_node_config({"partition-id": 3, "num-partitions": 3}, num_clients=4)
    with pytest.raises(P.NodeConfigError, match="none of the"):
        P.parse_node_config({"partition-id": 4, "num-partitions": 5}, num_clients=4)
    with pytest.raises(P.NodeConfigError, match="role"):
        P.parse_node_config({"role": "server"}, num_clients=4)
    with pytest.raises(P.NodeConfigError, match="twice"):
        P.parse_node_config({"client-ids": "1,1"}, num_clients=4)


def test_merge_client_state_takes_only_the_nodes_clients():
    server = {
        "histories": {"0": [[1.0, 0.1, 3]], "1": [], "2": []},
        "rounds_trained": {"0": 1, "1": 0, "2": 0},
    }
    node = {
        "histories": {"0": [], "1": [[1.0, 0.1, 3]], "2": [[9.0, 9.0, 9]]},
        "rounds_trained": {"1": 1, "2": 5},
    }
    merged = P.merge_client_state(server, node, [1])
    assert merged["histories"] == {"0": [[1.0, 0.1, 3]], "1": [[1.0, 0.1, 3]], "2": []}
    assert merged["rounds_trained"] == {"0": 1, "1": 1, "2": 0}
    assert server["histories"]["1"] == []  # the server's dict is not mutated


def test_adapter_record_round_trip_is_exact():
    state = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4) * 1e-30}
    back = P.adapter_from_record(P.adapter_to_record(state), names=list(state))
    assert list(back) == list(state)
    for k in state:
        assert torch.equal(back[k], state[k])


# ---- state carried between ClientApp processes ------------------------------------------------
def test_secagg_client_state_survives_serialisation_at_every_stage():
    """A round where every client is exported/imported between stages sums like the plain sum."""
    from fedsecure._hazmat.quantisation import dequantise, sum_error_bound
    from fedsecure.defenses.secagg import SecAggTransport
    from fedsecure.defenses.secagg.protocol import RoundSetup, SecAggClient, SecAggServer, new_nonce
    from fedsecure.engines.flower.state import StateFormatError, export_secagg_client, import_secagg_client

    t = SecAggTransport(max_dropout_fraction=0.0, max_corrupt_fraction=0.0, max_weight=3.0)
    ids, n_params = [0, 1, 2, 3], 50
    g, spec = t.graph_parameters(len(ids)), t._fixed_point(len(ids))
    setup = RoundSetup(
        run_id="r",
        round=0,
        nonce=new_nonce(),
        client_ids=tuple(ids),
        neighbours=g.neighbours,
        threshold=g.threshold,
        ring_bits=spec.ring_bits,
        scale=spec.scale,
        clip_range=spec.clip_range,
        max_weight=3.0,
        num_params=n_params,
    )

    def hop(c: SecAggClient) -> SecAggClient:
        blob = export_secagg_client(c, global_hash="h")
        again, gh = import_secagg_client(blob)
        assert gh == "h" and again.stage == c.stage
        return again

    rng = np.random.default_rng(0)
    xs = {c: rng.uniform(-0.5, 0.5, n_params).astype(np.float32) for c in ids}
    server = SecAggServer(setup, global_hash="h")
    clients = {c: hop(SecAggClient(c, setup, global_hash="h")) for c in ids}
    adv = {}
    for c in ids:
        adv[c] = clients[c].advertise_keys()
        clients[c] = hop(clients[c])
    routed = server.receive_advertise(adv)
    shares = {}
    for c in ids:
        shares[c] = clients[c].share_keys(routed[c])
        clients[c] = hop(clients[c])
    fwd = server.receive_shares(shares)
    for c in ids:
        server.add_masked_input(clients[c].masked_input(fwd[c], xs[c], weight=2.0))
        clients[c] = hop(clients[c])
        assert clients[c]._enc_sk is None and clients[c]._self_seed == b""  # own secrets already dropped
    reqs = server.unmask_requests()
    resp = {c: clients[c].unmask(reqs[c]) for c in ids}
    total = dequantise(server.receive_unmask(resp), spec=spec)
    bound = sum_error_bound(spec=spec, num_clients=4, max_weight=3.0, stochastic=False)
    assert np.abs(total - 2.0 * sum(x.astype(np.float64) for x in xs.values())).max() <= bound
    assert b'enc_sk":null' in export_secagg_client(
        clients[0], global_hash="h"
    )  # after unmask: no secret left
    with pytest.raises(StateFormatError):
        import_secagg_client(b'{"magic": "something else"}')


def test_ckks_key_holder_state_keeps_the_secret_and_the_one_decryption_rule():
    pytest.importorskip("tenseal")
    from fedsecure.defenses.ckks import CkksAggregator, CkksClient, CkksTransport, RoundLayout
    from fedsecure.engines.flower.state import export_ckks_key_holder, import_ckks_key_holder
    from fedsecure.models.lora import FlatSpec
    from fedsecure.types import ClientUpdate

    t = CkksTransport()
    holder = t.key_holder
    key = holder.new_context(round=0, run_id="run")
    blob = export_ckks_key_holder(holder)
    restored = import_ckks_key_holder(blob, params=t.params, flooding_std_coeff_units=16.0)
    state = {"w": torch.zeros(3, 5)}
    layout = RoundLayout(
        round=0,
        spec=FlatSpec.of(state),
        slots=t.params.slots,
        encrypted_index=np.arange(15),
        plaintext_index=np.arange(0),
    )
    client, agg = CkksClient(params=t.params), CkksAggregator(params=t.params)
    client.load(key)
    agg.load(key)
    deltas = [torch.linspace(-1, 1, 15).reshape(3, 5), torch.ones(3, 5) * 0.25]
    from fedsecure.federation.transport import Sealed

    sealed = []
    for i, d in enumerate(deltas):
        payload, _ = client.seal(
            ClientUpdate(i, 0, {"w": d}, num_examples=2), layout=layout, per_client_bound=1e3
        )
        sealed.append(Sealed(client_id=i, weight=2.0, payload=payload, nbytes=len(payload)))
    payload, total_weight = agg.combine(sealed, layout=layout, expected_clients=(0, 1))
    flat, _ = restored.decrypt_aggregate(payload, layout=layout, num_clients=2)
    expect = (2.0 * (deltas[0] + deltas[1])).reshape(-1).numpy()
    assert total_weight == 4.0 and np.abs(flat - expect).max() < 1e-5
    again = import_ckks_key_holder(
        export_ckks_key_holder(restored), params=t.params, flooding_std_coeff_units=16.0
    )
    with pytest.raises(PermissionError, match="one aggregate per round"):
        again.decrypt_aggregate(payload, layout=layout, num_clients=2)
    # what the key holder publishes holds no secret key
    import tenseal as ts

    assert not ts.context_from(key.context_bytes).has_secret_key()


# ---- the engine over the loopback Grid ---------------------------------------------------------
@pytest.mark.slow
def test_plain_on_flower_equals_the_simulation_exactly():
    cfg = _cfg(**{"data.num_clients": 3, "federation.rounds": 2})
    sim = Experiment(cfg)
    sim_res = sim.run()
    res, exp, engine, grid = _flower_run(cfg, {11: {"client-ids": "0,2"}, 22: {"client-ids": "1"}})
    from fedsecure.models import get_adapter_state

    assert _max_diff(get_adapter_state(exp.model), get_adapter_state(sim.model)) == 0.0
    assert res.utility["eval_loss_by_round"] == sim_res.utility["eval_loss_by_round"]
    assert engine.client_node == {0: 11, 1: 22, 2: 11}
    trains = [n for n, t in grid.log if t == P.TRAIN]
    assert sorted(trains) == [11, 11, 22, 22]  # one message per SuperNode per round, for all its clients
    assert [r["aggregated"] for r in res.rounds] == [[0, 1, 2], [0, 1, 2]]
    assert set(res.to_dict()) == set(sim_res.to_dict())


def survivors_fedavg(cfg: Any, *, survivors: Iterable[int], num_clients: int):
    """Oracle for round 0: (start adapter, FedAvg of the survivors' plaintext deltas, their total weight)."""
    from fedsecure.data.tokenize import encode_dataset
    from fedsecure.federation.client import derive_seed, run_client
    from fedsecure.models import attach_lora, get_adapter_state, load_model
    from fedsecure.registry import DATASETS
    from fedsecure.types import RoundContext, adapter_hash

    base, tok = load_model(cfg.model.name, seed=0)
    torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
    model = attach_lora(base, cfg.lora)
    start = get_adapter_state(model)
    ds = DATASETS.get(cfg.data.dataset)(**{"seed": cfg.seed, **dict(cfg.data.params)})
    ctx = RoundContext(
        round=0,
        num_rounds=cfg.federation.rounds,
        sampled_clients=tuple(range(num_clients)),
        num_clients=num_clients,
        seed=cfg.seed,
        global_hash=adapter_hash(start),
        run_id=cfg.config_hash(),
    )
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in start.items()}
    weight = 0
    for c in survivors:
        out = run_client(
            model=model,
            global_state=start,
            announced_hash=ctx.global_hash,
            features=encode_dataset(tok, list(ds.clients[c]), max_length=cfg.data.max_length),
            num_examples=len(ds.clients[c]),
            fed=cfg.federation,
            defenses=[],
            ctx=ctx,
            client_id=c,
            pad_token_id=tok.pad_token_id,
        )
        weight += out.update.num_examples
        for k in total:
            total[k] += out.update.delta[k].double() * out.update.num_examples
    return start, {k: v / weight for k, v in total.items()}, weight


@pytest.mark.slow
def test_secagg_on_flower_recovers_the_survivors_sum_when_a_node_dies_mid_round():
    cfg = _cfg(
        **{
            "data.num_clients": 8,
            "transport": {"name": "secagg", "max_dropout_fraction": 0.25, "max_corrupt_fraction": 0.0},
        }
    )
    nodes = {1: {"client-ids": "0,1,2"}, 2: {"client-ids": "3,4,5"}, 3: {"client-ids": "6,7"}}
    res, exp, _engine, grid = _flower_run(cfg, nodes, die={3: P.TRAIN})
    rec = res.cost["transport"]["rounds"][0]
    assert rec["status"] == "ok" and rec["survivors"] == 6
    assert rec["dropped_at"]["masked_input"] == [6, 7] and rec["masks_regenerated"] > 0
    assert res.rounds[0]["dropped"] == [6, 7] and res.rounds[0]["aggregated"] == [0, 1, 2, 3, 4, 5]
    assert (3, P.SECAGG_UNMASK) not in grid.log  # the dead node is not asked to unmask
    start, mean, weight = survivors_fedavg(cfg, survivors=range(6), num_clients=8)
    from fedsecure.models import get_adapter_state

    final = get_adapter_state(exp.model)
    tol = rec["quantisation_error_bound"] / weight + 1e-6
    worst = max(float((final[k].double() - start[k].double() - mean[k]).abs().max()) for k in start)
    assert worst <= tol, (worst, tol)
    assert max(float(mean[k].abs().max()) for k in mean) > 100 * tol  # the check is not vacuous


@pytest.mark.slow
def test_ckks_and_dp_on_flower_match_the_simulation_with_the_key_holder_as_its_own_node():
    pytest.importorskip("tenseal")
    pytest.importorskip("opacus")
    cfg = _cfg(
        **{
            "data.num_clients": 2,
            "transport": {"name": "ckks"},
            "defenses": [{"name": "dp-sgd", "noise_multiplier": 0.8, "max_grad_norm": 1.0}],
        }
    )
    sim = Experiment(cfg)
    sim_res = sim.run()
    res, exp, engine, grid = _flower_run(
        cfg,
        {
            5: {"partition-id": 0, "num-partitions": 2},
            6: {"partition-id": 1, "num-partitions": 2},
            9: {"role": "key-holder"},
        },
    )
    from fedsecure.models import get_adapter_state

    assert _max_diff(get_adapter_state(exp.model), get_adapter_state(sim.model)) < 1e-6
    assert engine.key_holder_node == 9
    assert (9, P.CKKS_KEYGEN) in grid.log and (9, P.CKKS_DECRYPT) in grid.log
    assert all(t != P.TRAIN for n, t in grid.log if n == 9)
    dp_f, dp_s = res.privacy["defenses"]["dp-sgd"], sim_res.privacy["defenses"]["dp-sgd"]
    assert dp_f["per_client_epsilon"] == dp_s["per_client_epsilon"] and dp_f["rounds_trained"] == {0: 1, 1: 1}
    assert res.privacy["epsilon_sample_level"] == pytest.approx(sim_res.privacy["epsilon_sample_level"])
    assert res.cost["transport"]["rounds"] == 1 and res.cost["transport"]["encrypt_s_per_client"] > 0


def test_discovery_names_the_uncovered_clients_and_the_missing_key_holder():
    cfg = _cfg(**{"data.num_clients": 3, "transport": {"name": "ckks"}})
    with pytest.raises(FlowerEngineError, match=r"clients \[2\] are served by no SuperNode.*no key-holder"):
        _flower_run(cfg, {1: {"client-ids": "0,1"}})
    cfg = _cfg(**{"data.num_clients": 2})
    with pytest.raises(FlowerEngineError, match="client 1 is served by SuperNodes"):
        _flower_run(cfg, {1: {"client-ids": "0,1"}, 2: {"client-ids": "1"}})


def test_a_clientapp_error_is_reported_with_its_node_not_hidden_as_a_dropout():
    cfg = _cfg(**{"data.num_clients": 2})
    grid = LoopbackGrid({4: {"client-ids": "0,1"}}, {P.RC_SCENARIO: dumps(cfg.to_dict())})
    messenger = Messenger(grid, poll_interval_s=0.01)
    with pytest.raises(RemoteClientError, match=r"SuperNode 4 failed on train\.fedsecure_round"):
        messenger.exchange({4: (P.TRAIN, RecordDict())}, timeout_s=2, group_id="x")
    grid.dead.add(4)
    replies, failures = messenger.exchange({4: (P.HELLO, RecordDict())}, timeout_s=2, group_id="x")
    assert replies == {} and "error 5" in failures[4]


def test_scenarios_that_cannot_cross_processes_are_refused_with_the_fix():
    cfg = _cfg(
        **{
            "transport": {
                "name": "secagg",
                "signed_keys": True,
                "max_dropout_fraction": 0.0,
                "max_corrupt_fraction": 0.0,
            }
        }
    )
    problems = flower_conflicts(Experiment(cfg))
    assert any("signed_keys = false" in p for p in problems)
    assert CompatibilityError  # raised by the ServerApp with these lines


# ---- launcher pieces ---------------------------------------------------------------------------
def test_unreachable_superlink_is_a_clear_error(tmp_path, capsys):
    from fedsecure.cli import main
    from fedsecure.engines.flower import SuperLinkUnreachableError, check_superlink
    from fedsecure.engines.flower.launcher import free_port

    port = free_port()
    with pytest.raises(
        SuperLinkUnreachableError, match=rf"cannot reach the Flower SuperLink at 127.0.0.1:{port}"
    ):
        check_superlink(f"127.0.0.1:{port}", timeout_s=0.5)
    scenario = tmp_path / "s.toml"
    scenario.write_text(dumps(tiny_tree()))
    rc = main(
        [
            "run",
            str(scenario),
            "--engine",
            "flower",
            "--superlink",
            f"127.0.0.1:{port}",
            "--insecure",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"cannot reach the Flower SuperLink at 127.0.0.1:{port}" in err and "flower-superlink" in err
    with pytest.raises(ValueError, match="HOST:PORT"):
        check_superlink("no-port-here")


def test_cli_flower_argument_conflicts_are_refused(tmp_path, capsys):
    from fedsecure.cli import main

    scenario = tmp_path / "s.toml"
    scenario.write_text(dumps(tiny_tree()))
    rc = main(["run", str(scenario), "--engine", "flower", "--superlink", "127.0.0.1:9", "--supernodes", "2"])
    assert rc == 2 and "--supernodes starts local SuperNodes" in capsys.readouterr().err


def test_generated_tls_certificates_verify_for_the_loopback_address(tmp_path):
    from cryptography import x509

    from fedsecure.engines.flower import generate_tls_certificates

    f = generate_tls_certificates(tmp_path, hosts=("127.0.0.1", "localhost"))
    ca = x509.load_pem_x509_certificate(f.ca_certificate.read_bytes())
    cert = x509.load_pem_x509_certificate(f.certificate.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (f.private_key.stat().st_mode & 0o777) == 0o600
    assert not list(tmp_path.glob("ca*.key"))  # the CA key is never written


def test_app_template_names_the_installed_components(tmp_path):
    import tomllib

    from fedsecure.engines.flower import write_app

    doc = tomllib.loads((write_app(tmp_path) / "pyproject.toml").read_text())
    comps = doc["tool"]["flwr"]["app"]["components"]
    assert comps == {
        "serverapp": "fedsecure.engines.flower.apps:server_app",
        "clientapp": "fedsecure.engines.flower.apps:client_app",
    }
    keys = set(doc["tool"]["flwr"]["app"]["config"])
    assert {P.RC_SCENARIO, P.RC_OUT_DIR, P.RC_RESUME, P.RC_TRAIN_TIMEOUT} <= keys
    assert json.dumps(doc)  # plain TOML
