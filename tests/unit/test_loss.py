"""The SPIN loss against numbers worked out by hand."""

import math

import pytest
import torch

from spin_ray.training.loss import spin_loss


def test_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    loss, m = spin_loss(logps, logps - 2, logps, logps - 2, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert float(m["rewards/margins"]) == 0 and float(m["rewards/accuracies"]) == 0


def test_sigmoid_loss_by_hand():
    # rewards/real = 0.5 * (−1 − (−3)) = 1; rewards/generated = 0.5 * (−4 − (−2)) = −1; margin 2 → −log σ(2)
    loss, m = spin_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                        beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    m = {k: float(v) for k, v in m.items()}  # 0-d tensors: the trainer reads them once per step
    assert m["rewards/real"] == pytest.approx(1.0) and m["rewards/generated"] == pytest.approx(-1.0)
    assert m["rewards/margins"] == pytest.approx(2.0) and m["rewards/accuracies"] == 1.0
    assert m["logps/real"] == -1.0 and m["logps/generated"] == -4.0


def test_hinge_and_batch_mean():
    # β·margins = [0.2, 3.0] → relu(1 − z) = [0.8, 0]; mean 0.4
    zero = torch.zeros(2)
    loss, m = spin_loss(torch.tensor([2.0, 30.0]), zero, zero, zero, beta=0.1, loss_type="hinge")
    assert loss.item() == pytest.approx(0.4)
    assert float(m["rewards/accuracies"]) == 1.0


def test_gradient_at_reference_pushes_real_up_and_generated_down():
    real = torch.tensor([-2.0], requires_grad=True)
    gen = torch.tensor([-2.0], requires_grad=True)
    loss, _ = spin_loss(real, gen, real.detach(), gen.detach(), beta=1.0)
    loss.backward()
    # d/dz −log σ(z) at 0 = −1/2
    assert real.grad.item() == pytest.approx(-0.5) and gen.grad.item() == pytest.approx(0.5)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type 'ipo'"):
        spin_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, loss_type="ipo")


def test_sft_term_by_hand():
    # At the reference the SPIN term is ln 2. NLL per token of y: 2/2 = 1 and 6/3 = 2, mean 1.5; weight 0.5 → +0.75.
    real = torch.tensor([-2.0, -6.0], requires_grad=True)
    gen = torch.tensor([-4.0, -1.0], requires_grad=True)
    loss, m = spin_loss(real, gen, real.detach(), gen.detach(), beta=0.1, sft_weight=0.5,
                        real_tokens=torch.tensor([2.0, 3.0]))
    assert loss.item() == pytest.approx(math.log(2) + 0.75, rel=1e-6)
    assert float(m["nll/real_per_token"]) == pytest.approx(1.5)
    loss.backward()
    # SPIN: −β σ(0) / B = −0.025 per pair; SFT: −w / (B |y|) = −0.5 / 4 = −0.125 and −0.5 / 6 = −0.0833...
    assert real.grad.tolist() == pytest.approx([-0.025 - 0.125, -0.025 - 0.5 / 6])
    assert gen.grad.tolist() == pytest.approx([0.025, 0.025])


def test_sft_weight_zero_is_the_papers_loss_and_needs_no_token_counts():
    real, gen = torch.tensor([-1.0]), torch.tensor([-4.0])
    plain, _ = spin_loss(real, gen, real - 2, gen + 2, beta=0.5)
    counted, m = spin_loss(real, gen, real - 2, gen + 2, beta=0.5, real_tokens=torch.tensor([4.0]))
    assert counted.item() == plain.item() and float(m["nll/real_per_token"]) == 0.25
    with pytest.raises(ValueError, match="sft_weight needs real_tokens"):
        spin_loss(real, gen, real, gen, beta=0.5, sft_weight=0.1)
