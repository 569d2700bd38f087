"""Bradley–Terry loss, its margin and centering variants, and the held-out metrics, against hand values."""

import math

import pytest
import torch

from reward.losses import bradley_terry_loss, calibration, expected_calibration_error, pair_stats


def test_bradley_terry_by_hand():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 2.0])
    # diffs [1, -2]: -logsigmoid(1) = log(1 + e^-1) = 0.3132616875182228
    #                -logsigmoid(-2) = log(1 + e^2) = 2.1269280110429727;  mean = 1.2200948492805978
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(1.2200948492805978, abs=1e-6)


def test_bradley_terry_margin_by_hand():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 2.0])
    margin = torch.tensor([0.5, 1.0])
    # diffs - margin = [0.5, -3]: log(1 + e^-0.5) = 0.4740769841801067, log(1 + e^3) = 3.048587351573742
    # mean = 1.7613321678769244
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(1.7613321678769244, abs=1e-6)
    # A zero margin is plain Bradley–Terry.
    assert bradley_terry_loss(chosen, rejected, torch.zeros(2)).item() == pytest.approx(1.2200948492805978, abs=1e-6)


def test_centering_term_by_hand():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 2.0])
    # (c + r)^2 = [1, 4], mean 2.5; 0.1 * 2.5 = 0.25 on top of 1.2200948492805978
    loss = bradley_terry_loss(chosen, rejected, center_coef=0.1)
    assert loss.item() == pytest.approx(1.4700948492805978, abs=1e-6)


def test_loss_gradient_by_hand():
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dc -logsigmoid(c - r) = -(1 - sigmoid(1)) = -0.2689414213699951; the rejected side gets the opposite
    assert chosen.grad.item() == pytest.approx(-0.2689414213699951, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.2689414213699951, abs=1e-6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="chosen and rejected"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3))


def test_pair_stats_by_hand():
    # diffs [2, -1, 0]: wins 1, 0, and a tie counts half -> accuracy 0.5; mean margin 1/3
    s = pair_stats(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert s["accuracy"] == pytest.approx(0.5, abs=1e-7)
    assert s["margin"] == pytest.approx(1 / 3, abs=1e-6)
    # rewards [2, 0, 1, 0, 1, 1]: mean 5/6
    assert s["reward_mean"] == pytest.approx(5 / 6, abs=1e-6)


def test_calibration_buckets_by_hand():
    chosen = torch.tensor([2.0, 0.0, 0.3, 0.0])
    rejected = torch.tensor([0.0, 1.5, 0.0, 0.2])
    # diffs [2, -1.5, 0.3, -0.2] -> |d| buckets: [0, 0.5): 0.3 (right), -0.2 (wrong); [1, 2): -1.5; [2, 4): 2
    b = calibration(chosen, rejected)
    assert [(x["low"], x["high"], x["count"]) for x in b] == [(0.0, 0.5, 2), (1.0, 2.0, 1), (2.0, 4.0, 1)]
    assert [x["accuracy"] for x in b] == pytest.approx([0.5, 0.0, 1.0], abs=1e-7)
    # predicted: mean(sigmoid(0.3), sigmoid(0.2)) = (0.574442516811659 + 0.549833997312478) / 2,
    # sigmoid(1.5) = 0.8175744761936437, sigmoid(2) = 0.8807970779778823
    assert [x["predicted"] for x in b] == pytest.approx([0.5621382570620685, 0.8175744761936437,
                                                          0.8807970779778823], abs=1e-6)
    # ECE = (2 * |0.5 - 0.56214| + 1 * |0 - 0.81757| + 1 * |1 - 0.88080|) / 4
    ece = (2 * 0.0621382570620685 + 0.8175744761936437 + 0.1192029220221177) / 4
    assert expected_calibration_error(b) == pytest.approx(ece, abs=1e-6)


def test_calibration_open_last_bucket():
    b = calibration(torch.tensor([10.0]), torch.tensor([0.0]), edges=(0.0, 1.0))
    assert b == [{"low": 1.0, "high": None, "count": 1, "accuracy": 1.0, "predicted": pytest.approx(
        1 / (1 + math.exp(-10)), abs=1e-6)}]
