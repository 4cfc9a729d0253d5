import pytest
import torch

from utils import finetune
from utils.cli import UserError
from utils.iterate_averaging import ParameterEMA


class Interrupt(Exception):
    pass


def quiet(*_):
    pass


def ema_of(start, iterates, decay):
    avg = [t.clone() for t in start]
    for it in iterates:
        avg = [decay * a + (1 - decay) * t for a, t in zip(avg, it)]
    return avg


def tracker(start, iterates, stop_after=None):
    """on_trainer_ready: the trainable weights before the first step, and after every step."""
    def ready(tr):
        params = finetune.trainable_parameters(tr.gpt)
        start[:] = [p.detach().clone() for p in params]

        def post(*_):
            iterates.append([p.detach().clone() for p in params])

        def pre(*_):
            if stop_after is not None and len(iterates) >= stop_after:
                raise Interrupt  # a crash after the step-3 checkpoint

        tr.optimizer.original_optimizer.register_step_pre_hook(pre)
        tr.optimizer.original_optimizer.register_step_post_hook(post)
    return ready


@pytest.fixture
def cfg(records_dir, tiny_ckpt, tmp_path):
    return dict(data_dir=records_dir, base_ckpt=tiny_ckpt, out_dir=str(tmp_path / "out"), batch_size=4,
                microbatch_size=2, eval_interval=0, block_size=48, noise_multiplier=1.0, target_epsilon=None,
                max_steps=6, checkpoint_interval=3, learning_rate=0.05, ema_decay=0.6)


def test_the_final_model_is_the_average_of_the_dp_iterates(cfg):
    start, iterates = [], []
    out = finetune.finetune({**cfg, "save": False}, log=quiet, on_trainer_ready=tracker(start, iterates))
    assert len(iterates) == 6
    final = finetune.trainable_parameters(out["model"])
    for got, want, last in zip(final, ema_of(start, iterates, 0.6), iterates[-1]):
        torch.testing.assert_close(got, want)
    assert any(not torch.allclose(got, last) for got, last in zip(final, iterates[-1]))  # not the last iterate
    assert out["privacy"]["ema_decay"] == 0.6


def test_a_resumed_run_continues_the_average_from_the_checkpoint(cfg):
    start, first = [], []
    with pytest.raises(Interrupt):
        finetune.finetune(cfg, log=quiet, on_trainer_ready=tracker(start, first, stop_after=4))
    resumed_start, rest = [], []
    lines = []
    out = finetune.finetune({**cfg, "init_from": "resume", "base_ckpt": finetune.DEFAULTS["base_ckpt"]},
                            log=lines.append, on_trainer_ready=tracker(resumed_start, rest))
    assert any("continued from the checkpoint" in line for line in lines)
    for a, b in zip(resumed_start, first[2]):
        torch.testing.assert_close(a, b)  # the resumed run starts at the step-3 weights...
    assert len(rest) == 3
    want = ema_of(start, first[:3] + rest, 0.6)  # ...and the average runs over all six iterates
    for got, w in zip(finetune.trainable_parameters(out["model"]), want):
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, "0.9", True])
def test_a_decay_outside_0_1_is_refused_before_anything_is_written(cfg, decay, tmp_path):
    with pytest.raises(UserError, match="ema_decay"):
        finetune.finetune({**cfg, "ema_decay": decay}, log=quiet)
    assert not (tmp_path / "out").exists()


def test_a_checkpointed_average_of_other_parameters_is_refused():
    ema = ParameterEMA([torch.zeros(3), torch.zeros(2, 2)], 0.9)
    with pytest.raises(UserError, match="does not match"):
        ema.load_state_dict({"decay": 0.9, "average": [torch.zeros(3)]})
