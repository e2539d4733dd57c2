import pytest

import train
from harness.protocols import PROTOCOLS, get_protocol, lr_at_epoch


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
def test_every_protocol_resolves_with_valid_settings_per_arm(dataset):
    from harness.protocols import ARMS, TUNED_ARMS
    from harness.settings import ARM_FIELDS, TrainConfig

    protocol = get_protocol(dataset)
    assert set(protocol.tuned) <= set(TUNED_ARMS)
    assert all(set(values) <= set(ARM_FIELDS) for values in protocol.tuned.values())
    config = TrainConfig(dataset=dataset, arms=tuple(ARMS)).resolved()  # checks every arm
    for arm in ARMS:
        assert config.for_arm(arm).finetune_lr > 0


def test_each_arm_resolves_its_settings_in_one_order(monkeypatch):
    import dataclasses

    from harness.settings import TrainConfig

    protocol = dataclasses.replace(PROTOCOLS["mnist"], finetune_lr=1e-3, tuned={
        "lns": {"alpha": 0.25, "mapper": "mlp", "finetune_lr": 2e-3},
        "bop": {"bop_threshold": 1e-6},
    })
    monkeypatch.setitem(PROTOCOLS, "mnist", protocol)
    config = TrainConfig(dataset="mnist", rho_pos=0.1, rho_neg=0.1).resolved()
    # The protocol's settings of the arm, over its finetune_lr; a given value wins.
    assert config.quantizer_options("lns") == {"alpha": 0.25, "mapper": "mlp", "rho_pos": 0.1,
                                               "rho_neg": 0.1}
    assert [config.for_arm(a).finetune_lr for a in ("sign", "bop", "lns", "mapped")] == [
        1e-3, 1e-3, 2e-3, 2e-3]  # mapped is tuned as lns
    assert config.quantizer_options("mapped")["alpha"] == 0.0  # the arm's own option wins
    assert config.quantizer_options("lns_rho0")["mapper"] == "mlp"
    assert config.for_arm("bop").bop_threshold == 1e-6 and config.for_arm("sign").bop_threshold is None
    # --hparams ARM=FILE (`tuned`) wins over the protocol, a flag over both.
    tuned = TrainConfig(dataset="mnist", tuned={"lns": {"alpha": 0.5, "finetune_lr": 5e-4}})
    assert (tuned.for_arm("lns").alpha, tuned.for_arm("lns").finetune_lr) == (0.5, 5e-4)
    assert tuned.for_arm("mapped").finetune_lr == 5e-4 and tuned.for_arm("sign").finetune_lr == 1e-3
    flagged = dataclasses.replace(tuned, alpha=2.0, finetune_lr=1e-4)
    assert (flagged.for_arm("lns").alpha, flagged.for_arm("sign").finetune_lr) == (2.0, 1e-4)
    # A preset replaces the protocol's settings: the paper's options, one rate for all.
    paper = TrainConfig(dataset="mnist", preset="paper").resolved()
    assert (paper.for_arm("lns").alpha, paper.for_arm("lns").finetune_lr) == (1.0, 1e-3)
    # Resolved once: resolving again is the same object; a change clears it.
    assert config.resolved() is config
    assert dataclasses.replace(config, seed=1).resolved() is not config


def test_preset_paper_is_one_flag_away_and_flags_still_win():
    from larq_noisy.quantizers import PAPER, PER_WEIGHT, NoisyMappedQuantizer

    default = train.parse_args([]).for_arm("lns")
    paper = train.parse_args(["--preset", "paper"]).for_arm("lns")
    assert {k: getattr(paper, k) for k in PAPER} == PAPER
    assert default.mapper != paper.mapper  # Fashion-MNIST's measured options differ
    assert paper.finetune_lr == get_protocol("fashion_mnist").finetune_lr  # one rate for all
    assert train.parse_args(["--preset", "paper", "--alpha", "0.5"]).for_arm("lns").alpha == 0.5
    # The quantizer's defaults are per_weight, measured at every layer size; so are the
    # protocols' of the larger models, and what a model without measured settings gets.
    assert {k: getattr(NoisyMappedQuantizer(), k if k != "mapper" else "mapper_kind")
            for k in PAPER} == PER_WEIGHT == {**PAPER, "mapper": "separable", "reduction": "mean"}
    for flags in (["--dataset", "cifar10"], ["--dataset", "imagenet2012"],
                  ["--dataset", "imagenette"], ["--model", "resnet20"],
                  ["--dataset", "imagenet2012", "--model", "resnet_e18"]):
        lns = train.parse_args(flags).for_arm("lns")
        assert {k: getattr(lns, k) for k in PAPER} == PER_WEIGHT, flags
