"""Secure aggregation benchmark: fedsecure's SecAgg+ vs Flower's SecAgg+ primitives, side by side.

For each setting (clients x parameters x dropout) both implementations run one full
round on the *same* float32 updates and weights, on the same neighbour-graph degree k
and threshold t (derived by fedsecure for 10% dropout / 10% corruption), with the same
clipping range:

- fedsecure: :class:`fedsecure.defenses.secagg.protocol.SecAggClient` / ``SecAggServer``
  (X25519, ChaCha20-Poly1305, Shamir over GF(2^256+297), AES-128-CTR masks, uint32 ring);
- Flower 1.41: the client and server steps of ``flwr``'s SecAgg+ (``secaggplus_mod`` /
  ``SecAggPlusWorkflow``) re-played with its own primitives, called directly:
  ``flwr.common.secure_aggregation.{quantization, secaggplus_utils, ndarrays_arithmetic,
  crypto.shamir, crypto.symmetric_encryption}`` and ``flwr.supercore.primitives.asymmetric``
  (ECDH P-384, Fernet, PyCryptodome Shamir, numpy RandomState masks, int64 upload).

Dropouts happen after the share exchange (the masked input never arrives), the costly
case for the server: it must rebuild the dropped clients' mask keys and regenerate
their pairwise masks. Timings are CPU seconds of this process pinned to one core
(``time.process_time``), so other load on the machine does not inflate them; wall
seconds are reported next to them. ``client_mask_s`` is the masked-input stage of one
client (decrypt the received shares, key agreement, weighting, quantisation, masking,
serialisation), median over the clients; ``server_unmask_s`` is the unmask stage
(rebuild secrets from shares, regenerate and remove masks, dequantise).

Run: ``.venv/bin/python benchmarks/secagg.py [--quick]`` -> benchmarks/results/secagg.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsecure._hazmat.quantisation import dequantise, no_wrap_scale, sum_error_bound
from fedsecure.defenses.secagg.graph import derive_graph
from fedsecure.defenses.secagg.protocol import (
    MaskedInput,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    new_nonce,
)

CLIP = 1.0
MAX_WEIGHT = 200.0
FLOWER_TARGET_RANGE = 4194304  # SecAggPlusWorkflow default quantization_range (2^22)
FLOWER_MOD_RANGE = 2**32  # SecAggPlusWorkflow default modulus_range


class Clock:
    """CPU and wall seconds of a code block."""

    def __enter__(self) -> Clock:
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.c0
        self.wall = time.perf_counter() - self.w0


def make_inputs(n: int, p: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)  # benchmark data, not security randomness
    xs = [(rng.standard_normal(p, dtype=np.float32) * 0.01).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(50, int(MAX_WEIGHT) + 1, size=n)]
    return xs, weights


def exact_weighted_mean(xs: list[np.ndarray], weights: list[int], ids: list[int]) -> np.ndarray:
    acc = np.zeros(xs[0].size, dtype=np.float64)
    for i in ids:
        acc += weights[i] * np.clip(xs[i].astype(np.float64), -CLIP, CLIP)
    return acc / sum(weights[i] for i in ids)


# ---- fedsecure ----------------------------------------------------------------------------
def run_fedsecure(xs, weights, *, k: int, t: int, dropped: set[int]) -> dict[str, Any]:
    n, p = len(xs), xs[0].size
    ids = list(range(n))
    setup = RoundSetup(
        run_id="bench",
        round=0,
        nonce=new_nonce(),
        client_ids=tuple(ids),
        neighbours=k,
        threshold=t,
        ring_bits=32,
        scale=no_wrap_scale(ring_bits=32, clip_range=CLIP, num_clients=n, max_weight=MAX_WEIGHT),
        clip_range=CLIP,
        max_weight=MAX_WEIGHT,
        num_params=p,
    )
    server = SecAggServer(setup, global_hash="bench-model")
    clients = {c: SecAggClient(c, setup, global_hash="bench-model") for c in ids}
    setup_cpu: dict[int, float] = dict.fromkeys(ids, 0.0)
    adv = {}
    for c in ids:
        with Clock() as clk:
            adv[c] = clients[c].advertise_keys()
        setup_cpu[c] += clk.cpu
    routed = server.receive_advertise(adv)
    shares = {}
    for c in ids:
        with Clock() as clk:
            shares[c] = clients[c].share_keys(routed[c])
        setup_cpu[c] += clk.cpu
    fwd = server.receive_shares(shares)
    mask_cpu, mask_wall, upload = [], [], []
    sum_cpu = 0.0
    survivors = [c for c in ids if c not in dropped]
    for c in survivors:
        with Clock() as clk:
            msg = clients[c].masked_input(fwd[c], xs[c], weight=float(weights[c]))
            wire = msg.to_bytes()
        mask_cpu.append(clk.cpu)
        mask_wall.append(clk.wall)
        upload.append(len(wire))
        with Clock() as clk:
            server.add_masked_input(MaskedInput.from_bytes(wire))
        sum_cpu += clk.cpu
        del wire, msg
    reqs = server.unmask_requests()
    resps = {w: clients[w].unmask(r) for w, r in reqs.items()}
    with Clock() as clk:
        ring = server.receive_unmask(resps)
        total = dequantise(ring, spec=setup.fixed_point)
    mean = total / sum(weights[c] for c in survivors)
    err = float(np.abs(mean - exact_weighted_mean(xs, weights, survivors)).max())
    bound = sum_error_bound(
        spec=setup.fixed_point, num_clients=len(survivors), max_weight=MAX_WEIGHT, stochastic=False
    ) / sum(weights[c] for c in survivors)
    return {
        "client_setup_s": statistics.median(setup_cpu.values()),
        "client_mask_s": statistics.median(mask_cpu),
        "client_mask_s_max": max(mask_cpu),
        "client_mask_wall_s": statistics.median(mask_wall),
        "server_sum_s": sum_cpu,
        "server_unmask_s": clk.cpu,
        "server_unmask_wall_s": clk.wall,
        "masks_regenerated": server.masks_regenerated,
        "upload_bytes_per_client": int(statistics.median(upload)),
        "max_abs_error_mean": err,
        "error_bound_mean": bound,
    }


# ---- Flower -------------------------------------------------------------------------------
def run_flower(xs, weights, *, k: int, t: int, dropped: set[int]) -> dict[str, Any]:
    """Flower 1.41 SecAgg+ client (secaggplus_mod) and server (SecAggPlusWorkflow) steps."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    n = len(xs)
    ids = list(range(n))
    num_shares = k + 1  # Flower's neighbourhoods include the node itself
    order = ids[:]
    random.Random(0).shuffle(order)  # the workflow shuffles node ids (stdlib random) before the ring
    half = num_shares >> 1
    nbrs = {nid: {order[(i + off) % n] for off in range(-half, half + 1)} for i, nid in enumerate(order)}
    st: dict[int, dict[str, Any]] = {c: {} for c in ids}
    setup_cpu: dict[int, float] = dict.fromkeys(ids, 0.0)
    # stage 0: setup (two key pairs)
    for c in ids:
        with Clock() as clk:
            sk1, pk1 = generate_key_pairs()
            sk2, pk2 = generate_key_pairs()
            s = st[c]
            s["sk1"], s["pk1"] = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
            s["sk2"], s["pk2"] = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
        setup_cpu[c] += clk.cpu
    pubkeys = {c: (st[c]["pk1"], st[c]["pk2"]) for c in ids}
    # stage 1: share keys
    fwd: dict[int, list[tuple[int, bytes]]] = {c: [] for c in ids}
    for c in ids:
        with Clock() as clk:
            s = st[c]
            s["pk_dict"] = {v: pubkeys[v] for v in sorted(nbrs[c])}
            s["rd_seed"] = os.urandom(32)
            b_shares = create_shares(s["rd_seed"], t, num_shares)
            sk1_shares = create_shares(s["sk1"], t, num_shares)
            s["rd_share"], s["sk1_share"], s["ss2"] = {}, {}, {}
            for idx, (nid, (_, pk2)) in enumerate(s["pk_dict"].items()):
                if nid == c:
                    s["rd_share"][c], s["sk1_share"][c] = b_shares[idx], sk1_shares[idx]
                else:
                    key = generate_shared_key(bytes_to_private_key(s["sk2"]), bytes_to_public_key(pk2))
                    s["ss2"][nid] = key
                    ct = encrypt(key, share_keys_plaintext_concat(c, nid, b_shares[idx], sk1_shares[idx]))
                    fwd[nid].append((c, ct))
        setup_cpu[c] += clk.cpu
    # stage 2: collect masked vectors
    survivors = [c for c in ids if c not in dropped]
    mask_cpu, mask_wall, upload = [], [], []
    sum_cpu = 0.0
    masked_sum = None
    for c in survivors:
        with Clock() as clk:
            s = st[c]
            available = []
            for src, ct in fwd[c]:
                _, _, rd_share, sk1_share = share_keys_plaintext_separate(decrypt(s["ss2"][src], ct))
                available.append(src)
                s["rd_share"][src], s["sk1_share"][src] = rd_share, sk1_share
            ratio = weights[c] / MAX_WEIGHT
            q_ratio = round(ratio * FLOWER_TARGET_RANGE)
            params = parameters_multiply([xs[c]], q_ratio / FLOWER_TARGET_RANGE)
            qp = quantize(params, CLIP, FLOWER_TARGET_RANGE)
            qp = factor_combine(q_ratio, qp)
            dims = [a.shape for a in qp]
            qp = parameters_addition(qp, pseudo_rand_gen(s["rd_seed"], FLOWER_MOD_RANGE, dims))
            for nid in available:
                shared = generate_shared_key(
                    bytes_to_private_key(s["sk1"]), bytes_to_public_key(s["pk_dict"][nid][0])
                )
                pw = pseudo_rand_gen(shared, FLOWER_MOD_RANGE, dims)
                qp = parameters_addition(qp, pw) if c > nid else parameters_subtraction(qp, pw)
            qp = parameters_mod(qp, FLOWER_MOD_RANGE)
            wire = [ndarray_to_bytes(a) for a in qp]
        mask_cpu.append(clk.cpu)
        mask_wall.append(clk.wall)
        upload.append(sum(len(b) for b in wire))
        with Clock() as clk:
            vec = [bytes_to_ndarray(b) for b in wire]
            masked_sum = vec if masked_sum is None else parameters_addition(masked_sum, vec)
        sum_cpu += clk.cpu
        del wire, vec, qp
    with Clock() as clk:
        masked_sum = parameters_mod(masked_sum, FLOWER_MOD_RANGE)
    sum_cpu += clk.cpu
    # stage 3: unmask (client answers, then the workflow's unmask_stage)
    active, dead = set(survivors), set(dropped)
    collected: dict[int, list[bytes]] = {c: [] for c in ids}
    for c in survivors:
        s = st[c]
        for nid in nbrs[c] & active:
            collected[nid].append(s["rd_share"][nid])
        for nid in nbrs[c] & dead:
            collected[nid].append(s["sk1_share"][nid])
    masks = 0
    with Clock() as clk:
        mv = masked_sum
        for nid, share_list in collected.items():
            if len(share_list) < t:
                raise RuntimeError(f"Flower: not enough shares for node {nid}")
            secret = combine_shares(share_list)
            if nid in active:
                mv = parameters_subtraction(
                    mv, pseudo_rand_gen(secret, FLOWER_MOD_RANGE, get_parameters_shape(mv))
                )
                masks += 1
            else:
                for other in nbrs[nid] - {nid}:
                    shared = generate_shared_key(
                        bytes_to_private_key(secret), bytes_to_public_key(pubkeys[other][0])
                    )
                    pw = pseudo_rand_gen(shared, FLOWER_MOD_RANGE, get_parameters_shape(mv))
                    mv = parameters_addition(mv, pw) if nid > other else parameters_subtraction(mv, pw)
                    masks += 1
        recon = parameters_mod(mv, FLOWER_MOD_RANGE)
        q_total, recon = factor_extract(recon)
        agg = dequantize(recon, CLIP, FLOWER_TARGET_RANGE)
        offset = -(len(active) - 1) * CLIP
        for v in agg:
            v += offset
            v *= FLOWER_TARGET_RANGE / q_total
    mean = agg[0]
    err = float(np.abs(mean - exact_weighted_mean(xs, weights, survivors)).max())
    return {
        "client_setup_s": statistics.median(setup_cpu.values()),
        "client_mask_s": statistics.median(mask_cpu),
        "client_mask_s_max": max(mask_cpu),
        "client_mask_wall_s": statistics.median(mask_wall),
        "server_sum_s": sum_cpu,
        "server_unmask_s": clk.cpu,
        "server_unmask_wall_s": clk.wall,
        "masks_regenerated": masks,
        "upload_bytes_per_client": int(statistics.median(upload)),
        "max_abs_error_mean": err,
        "error_bound_mean": None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secagg.json")
    ap.add_argument("--skip-flower", action="store_true")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})  # one core for both implementations
    if args.quick:
        settings = [(10, 100_000, 0.0), (10, 100_000, 0.1), (20, 100_000, 0.1)]
    else:
        settings = [(10, 1_000_000, 0.0), (10, 1_000_000, 0.1), (100, 1_000_000, 0.0), (100, 1_000_000, 0.1)]
    rows: list[dict[str, Any]] = []
    for n, p, dropout in settings:
        g = derive_graph(n, max_dropout_fraction=0.1, max_corrupt_fraction=0.1)
        xs, weights = make_inputs(n, p, seed=n * 7 + int(dropout * 100))
        dropped = set(random.Random(n).sample(range(n), round(dropout * n)))
        impls = [("fedsecure", run_fedsecure)] + ([] if args.skip_flower else [("flower", run_flower)])
        for impl, fn in impls:
            res = fn(xs, weights, k=g.neighbours, t=g.threshold, dropped=dropped)
            row = {
                "impl": impl,
                "clients": n,
                "params": p,
                "dropout": dropout,
                "dropped": len(dropped),
                "neighbours": g.neighbours,
                "threshold": g.threshold,
                **res,
                "fp32_bytes_per_client": 4 * p,
            }
            row["upload_ratio_vs_fp32"] = row["upload_bytes_per_client"] / row["fp32_bytes_per_client"]
            rows.append(row)
            print(
                f"{impl:9s} n={n:3d} P={p:>8d} drop={dropout:.1f} k={g.neighbours} t={g.threshold}: "
                f"client mask {row['client_mask_s'] * 1e3:7.1f} ms, "
                f"server unmask {row['server_unmask_s']:6.3f} s, "
                f"upload {row['upload_ratio_vs_fp32']:.3f}x fp32, err {row['max_abs_error_mean']:.2e}",
                flush=True,
            )
            del res
    for n, p, dropout in settings:
        pair = {r["impl"]: r for r in rows if (r["clients"], r["params"], r["dropout"]) == (n, p, dropout)}
        if "flower" in pair:
            for key in ("client_mask_s", "server_unmask_s"):
                pair["fedsecure"][f"speedup_{key}"] = pair["flower"][key] / pair["fedsecure"][key]
    meta = {
        "_meta": {
            "timing": "CPU seconds (time.process_time) pinned to one core; *_wall_s are wall seconds",
            "machine": _cpu_model(),
            "cores_visible": os.cpu_count(),
            "python": platform.python_version(),
            "note": "dropouts happen after the share exchange; same inputs, k, t, clip for both impls",
        }
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    (args.out.parent / (args.out.stem + ".meta.json")).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
