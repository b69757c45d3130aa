"""Under DDP a summed consistency term must be summed over the global batch: the ranks'
averaged gradient equals one process's gradient on the whole batch (no processes needed)."""
import pytest
import torch

from nla_fast import distributed, nla_loss
from nla_fast.config import NLAConfig
from nla_fast.settings import parse_command_line


def linear_model_grads(config, scale, x, x_flip, target, eps):
    """Loss and gradient of a shared linear classifier on one (rank's) batch, the step's loss times ``scale``."""
    weight = torch.randn(x.shape[1], 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight.requires_grad_(True)
    loss = scale * nla_loss(x @ weight, x_flip @ weight, target, eps=eps, config=config, backend="reference")
    loss.backward()
    return loss.detach(), weight.grad


def batch(size=16, features=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, features, dtype=torch.float64, generator=g)
    return x, x + 0.3 * torch.randn(size, features, dtype=torch.float64, generator=g), torch.randint(0, 7, (size,), generator=g)


@pytest.mark.parametrize("config", [NLAConfig(), NLAConfig.official(lam=0.3), NLAConfig(consistency="jsd",
                                                                                         consistency_reduction="sum")])
@pytest.mark.parametrize("world_size", [2, 4])
def test_averaged_rank_gradients_equal_the_global_batch_gradient(config, world_size):
    x, x_flip, target = batch()
    eps = 0.6
    full_loss, full_grad = linear_model_grads(config, 1.0, x, x_flip, target, eps)
    rank_config, scale = distributed.global_batch_loss(config, world_size)
    assert scale == pytest.approx(config.lam + (1 - config.lam) * world_size)
    parts = [linear_model_grads(rank_config, scale, x[r::world_size], x_flip[r::world_size], target[r::world_size], eps)
             for r in range(world_size)]
    averaged = sum(grad for _, grad in parts) / world_size  # what DDP's all-reduce gives every rank
    torch.testing.assert_close(averaged, full_grad, rtol=1e-10, atol=1e-12)
    # the train_loss the trainer reports (the ranks' mean of the scaled loss) is the global batch's
    assert float(sum(loss for loss, _ in parts) / world_size) == pytest.approx(float(full_loss), rel=1e-10)
    # and without the scaling the sum term's gradient is world_size times too small
    plain = sum(linear_model_grads(config, 1.0, x[r::world_size], x_flip[r::world_size], target[r::world_size],
                                   eps)[1] for r in range(world_size)) / world_size
    assert not torch.allclose(plain, full_grad, rtol=1e-3)


def test_a_mean_reduction_or_one_process_needs_no_scaling():
    mean = NLAConfig(consistency_reduction="mean")
    assert distributed.global_batch_loss(mean, 8) == (mean, 1.0)
    assert distributed.global_batch_loss(NLAConfig(), 1) == (NLAConfig(), 1.0)


def test_consistency_reduction_flag_reaches_the_loss_config():
    default = parse_command_line([]).settings
    assert default.consistency_reduction is None and default.nla_config().consistency_reduction == "sum"
    chosen = parse_command_line(["--consistency-reduction", "mean", "--preset", "official"]).settings
    assert chosen.nla_config().consistency_reduction == "mean" and chosen.nla_config() == NLAConfig.official(
        consistency_reduction="mean")
    assert parse_command_line(["--consistency", "jsd"]).settings.nla_config().consistency_reduction == "mean"
    with pytest.raises(SystemExit):
        parse_command_line(["--consistency-reduction", "max"])
