import pytest

from utils import finetune, pretrain
from utils.cli import UserError
from utils.lr_schedule import finetune_lr, get_lr


def test_pretrain_warmup_then_cosine_to_min():
    cfg = {**pretrain.DEFAULTS, "learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 4, "lr_decay_iters": 20}
    lrs = [get_lr(i, cfg) for i in range(25)]
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5]))  # warmup rises
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:20], lrs[5:21]))  # cosine falls
    assert lrs[20:] == [0.1] * 5
    assert get_lr(7, {**cfg, "decay_lr": False}) == 1.0


def test_finetune_cosine_reaches_the_floor_at_the_last_planned_step():
    cfg = {**finetune.DEFAULTS, "learning_rate": 2.0, "lr_schedule": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.05}
    lrs = [finetune_lr(i, 50, cfg) for i in range(50)]
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert all(a > b for a, b in zip(lrs[3:49], lrs[4:50]))
    assert lrs[-1] == pytest.approx(0.1)
    assert {finetune_lr(i, 50, {**cfg, "lr_schedule": "constant"}) for i in range(50)} == {2.0}
    assert finetune_lr(0, 1, {**cfg, "warmup_steps": 0}) == pytest.approx(2.0)  # one step: the peak


def test_finetune_wsd_holds_the_peak_then_falls_straight_to_the_floor_over_the_last_share():
    cfg = {**finetune.DEFAULTS, "learning_rate": 2.0, "lr_schedule": "wsd", "warmup_steps": 2, "min_lr_ratio": 0.1,
           "decay_fraction": 0.2}
    lrs = [finetune_lr(i, 50, cfg) for i in range(50)]
    assert lrs[:2] == pytest.approx([2 / 3, 4 / 3])  # warmup
    assert lrs[2:41] == pytest.approx([2.0] * 39)  # the peak until the last 10 steps begin
    assert all(a > b for a, b in zip(lrs[40:49], lrs[41:50]))
    steps = [a - b for a, b in zip(lrs[40:49], lrs[41:50])]
    assert steps == pytest.approx([steps[0]] * 9)  # a straight line
    assert lrs[-1] == pytest.approx(0.2)
    assert finetune_lr(0, 1, {**cfg, "warmup_steps": 0}) == pytest.approx(2.0)  # one step: the peak
    assert finetune_lr(99, 100, {**cfg, "decay_fraction": 1.0, "warmup_steps": 0}) == pytest.approx(0.2)


class Interrupt(Exception):
    pass


def test_a_finetune_follows_the_schedule_and_a_resumed_run_continues_it(records_dir, tiny_ckpt, tmp_path):
    cfg = dict(data_dir=records_dir, base_ckpt=tiny_ckpt, out_dir=str(tmp_path / "out"), batch_size=4, microbatch_size=2,
               eval_interval=0, block_size=48, noise_multiplier=1.0, target_epsilon=None, max_steps=6,
               checkpoint_interval=3, learning_rate=0.01, lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.2)
    seen = []

    def record(stop_after=None):
        def ready(tr):
            def pre(opt, *_):
                seen.append(opt.param_groups[0]["lr"])
                if stop_after is not None and len(seen) > stop_after:
                    raise Interrupt  # a crash after the step-3 checkpoint
            tr.optimizer.original_optimizer.register_step_pre_hook(pre)
        return ready

    with pytest.raises(Interrupt):
        finetune.finetune(cfg, log=lambda *a: None, on_trainer_ready=record(stop_after=4))
    assert seen[:4] == pytest.approx([finetune_lr(i, 6, cfg) for i in range(4)])
    assert seen[0] < seen[1] > seen[3]  # warmup, then decay
    seen.clear()
    finetune.finetune({**cfg, "init_from": "resume", "base_ckpt": finetune.DEFAULTS["base_ckpt"]}, log=lambda *a: None, on_trainer_ready=record())
    assert seen == pytest.approx([finetune_lr(i, 6, cfg) for i in range(3, 6)])  # steps 3..5, not a fresh schedule
    for bad in (dict(lr_schedule="linear"), dict(lr_schedule="wsd", decay_fraction=0.0)):
        with pytest.raises(UserError, match="lr_schedule"):
            finetune.finetune({**cfg, **bad, "out_dir": str(tmp_path / "bad")}, log=lambda *a: None)
        assert not (tmp_path / "bad").exists()
