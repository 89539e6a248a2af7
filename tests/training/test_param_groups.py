import pytest
import torch
from torch import nn

from lightning_nipq.training import split_quantizer_params


def _params():
    main = [nn.Parameter(torch.randn(3)) for _ in range(2)]
    quant = [nn.Parameter(torch.randn(())) for _ in range(2)]
    return main, quant


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.5**e),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o, [torch.optim.lr_scheduler.ConstantLR(o, 0.5, 2), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], [2]
        ),
    ],
)
def test_split_scales_learning_rates_and_follows_the_scheduler(make_scheduler):
    main, quant = _params()
    opt = torch.optim.SGD(main + quant, lr=0.1, momentum=0.9, weight_decay=0.01)
    sched = make_scheduler(opt)
    done = split_quantizer_params([opt], quant, lr_factor=4.0, schedulers=[sched])
    assert len(done) == 1 and len(opt.param_groups) == 2
    g_main, g_quant = opt.param_groups
    assert g_quant["params"] == quant and g_main["params"] == main
    assert g_quant["weight_decay"] == 0.0 and g_quant["momentum"] == g_main["momentum"]
    for _ in range(3):
        opt.step()
        sched.step()
        assert g_quant["lr"] == pytest.approx(4.0 * g_main["lr"])
        assert g_quant["momentum"] == g_main["momentum"]  # OneCycleLR cycles it in both


def test_user_groups_of_quantizer_parameters_are_left_alone_and_missing_ones_added():
    main, quant = _params()
    opt = torch.optim.Adam([{"params": main}, {"params": quant[:1], "lr": 0.5}], lr=0.01)
    done = split_quantizer_params([opt], quant, lr_factor=10.0)
    assert opt.param_groups[1]["lr"] == 0.5  # the user's own group
    assert opt.param_groups[2]["params"] == quant[1:] and opt.param_groups[2]["lr"] == pytest.approx(0.1)
    assert "were in no optimizer" in done[-1]


def test_no_split_when_nothing_would_change():
    main, quant = _params()
    opt = torch.optim.Adam(main + quant, lr=0.01)
    assert split_quantizer_params([opt], quant, lr_factor=1.0) == []
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)])
def test_the_quantizer_group_takes_the_fused_implementation_and_steps_as_the_loop_does(make):
    torch.manual_seed(0)
    main, quant = _params()
    reference = [nn.Parameter(q.detach().clone()) for q in quant]
    opt, plain = make(main + quant), make(reference)
    split_quantizer_params([opt], quant, lr_factor=4.0)
    for group in plain.param_groups:
        group["lr"] *= 4.0
        group["weight_decay"] = 0.0
    assert opt.param_groups[1]["fused"] is True and opt.param_groups[0]["fused"] is None
    for _ in range(5):
        grads = [torch.randn(()) for _ in quant]
        for p, r, g in zip(quant, reference, grads):
            p.grad, r.grad = g.clone(), g.clone()
        for p in main:
            p.grad = torch.randn(3)
        opt.step()
        plain.step()
    for p, r in zip(quant, reference):
        assert torch.allclose(p, r, rtol=1e-6, atol=1e-7)


def test_a_group_whose_implementation_the_user_chose_keeps_it():
    main, quant = _params()
    opt = torch.optim.Adam(main + quant, lr=0.01, foreach=True)
    split_quantizer_params([opt], quant, lr_factor=4.0)
    assert opt.param_groups[1]["foreach"] is True and opt.param_groups[1]["fused"] is None
    opt = torch.optim.RAdam(main + quant, lr=0.01)  # no fused implementation: nothing changes
    split_quantizer_params([opt], quant, lr_factor=4.0)
    assert "fused" not in opt.param_groups[1]
