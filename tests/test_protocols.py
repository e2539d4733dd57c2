import pytest

import train
from larq_noisy.protocols import PROTOCOLS, get_protocol, lr_at_epoch


def _schedule(protocol, phase):
    epochs = getattr(protocol, f"{phase}_epochs")
    lr = protocol.lr if phase == "pretrain" else protocol.finetune_lr
    milestones = getattr(protocol, f"{phase}_milestones")
    cosine = protocol.pretrain_cosine if phase == "pretrain" else False
    return [lr_at_epoch(e, lr, epochs, milestones, cosine) for e in range(epochs)]


def test_imagenet_follows_the_paper():
    p = get_protocol("imagenet2012")
    lrs = _schedule(p, "pretrain")  # 0.1, x0.1 at epochs 70, 90 and 110
    assert (lrs[69], lrs[70], lrs[89], lrs[90], lrs[110]) == pytest.approx(
        (0.1, 0.01, 0.01, 0.001, 0.0001)
    )
    ft = _schedule(p, "finetune")  # 45 epochs, 0.01 x0.1 every 15
    assert (ft[0], ft[14], ft[15], ft[30], ft[44]) == pytest.approx((0.01, 0.01, 1e-3, 1e-4, 1e-4))
    assert (p.batch_size, p.optimizer) == (256, "sgd")


def test_cifar10_finetuning_decays_every_30_epochs():
    ft = _schedule(get_protocol("cifar10"), "finetune")
    assert len(ft) == 120
    assert (ft[29], ft[30], ft[60], ft[90]) == pytest.approx((0.01, 1e-3, 1e-4, 1e-5))


def test_cosine_pretraining_starts_at_the_rate_and_decays():
    lrs = _schedule(get_protocol("fashion_mnist"), "pretrain")
    assert lrs[0] == PROTOCOLS["fashion_mnist"].lr and lrs == sorted(lrs, reverse=True)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="'svhn'.*cifar10"):
        get_protocol("svhn")


@pytest.mark.parametrize("dataset", sorted(PROTOCOLS))
def test_lns_defaults_are_valid_options(dataset):
    from larq_noisy.quantizers import check_options

    check_options(**get_protocol(dataset).lns)


def test_lns_defaults_fill_the_config_and_flags_win(monkeypatch):
    import dataclasses

    from larq_noisy.training import TrainConfig

    protocol = dataclasses.replace(PROTOCOLS["mnist"], lns={"alpha": 0.25, "mapper": "mlp"})
    monkeypatch.setitem(PROTOCOLS, "mnist", protocol)
    config = TrainConfig(dataset="mnist", rho_pos=0.1, rho_neg=0.1).resolved()
    assert (config.alpha, config.mapper) == (0.25, "mlp")  # in config.json: checked on resume
    assert config.quantizer_options("lns") == {"alpha": 0.25, "mapper": "mlp", "rho_pos": 0.1,
                                               "rho_neg": 0.1}
    assert config.quantizer_options("mapped")["alpha"] == 0.0  # the arm's own option wins
    assert TrainConfig(dataset="mnist", alpha=2.0).resolved().alpha == 2.0  # a flag wins


def test_preset_paper_is_one_flag_away_and_flags_still_win():
    from larq_noisy.quantizers import PAPER, NoisyMappedQuantizer

    default = train.parse_args([]).resolved()
    paper = train.parse_args(["--preset", "paper"]).resolved()
    assert {k: getattr(paper, k) for k in PAPER} == PAPER
    assert default.mapper != paper.mapper  # Fashion-MNIST's measured options differ
    assert train.parse_args(["--preset", "paper", "--alpha", "0.5"]).resolved().alpha == 0.5
    # The paper's values are the quantizer's defaults: one definition.
    assert {k: getattr(NoisyMappedQuantizer(), k if k != "mapper" else "mapper_kind")
            for k in PAPER} == PAPER
