"""Aggregators on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from fedsecure.federation.aggregation import FedAvg, Krum, Median, TrimmedMean
from fedsecure.types import ClientUpdate


def upd(cid: int, values: list[float], n: int = 1) -> ClientUpdate:
    return ClientUpdate(client_id=cid, round=0, delta={"w": torch.tensor(values)}, num_examples=n)


def test_fedavg_weights_by_examples():
    out = FedAvg().aggregate([upd(0, [1.0, 0.0], n=1), upd(1, [4.0, 3.0], n=3)])
    assert torch.allclose(out["w"], torch.tensor([(1 + 12) / 4, 9 / 4]))
    s = {"w": torch.tensor([13.0, 9.0])}
    assert torch.allclose(FedAvg().from_sum(s, total_weight=4)["w"], out["w"])
    with pytest.raises(ValueError):
        FedAvg().from_sum(s, total_weight=0)


def test_median_and_trimmed_mean():
    ups = [upd(0, [1.0]), upd(1, [2.0]), upd(2, [100.0]), upd(3, [3.0])]
    assert Median().aggregate(ups)["w"].item() == pytest.approx(2.5)
    assert Median().aggregate(ups[:3])["w"].item() == pytest.approx(2.0)
    assert TrimmedMean(trim_fraction=0.25).aggregate(ups)["w"].item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(trim_fraction=0.5)


def test_krum_picks_the_central_update():
    ups = [upd(0, [0.0, 0.0]), upd(1, [0.1, 0.0]), upd(2, [0.0, 0.1]), upd(3, [0.1, 0.1]), upd(4, [50.0, 50.0])]
    out = Krum(num_byzantine=1).aggregate(ups)
    assert out["w"].abs().max() <= 0.1
    multi = Krum(num_byzantine=1, num_selected=4).aggregate(ups)
    assert torch.allclose(multi["w"], torch.tensor([0.05, 0.05]))
    with pytest.raises(ValueError, match="2f \\+ 3"):
        Krum(num_byzantine=2).aggregate(ups)
