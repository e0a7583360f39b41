"""Loading a checkpoint's optimizer state: the moments and step counts come back, this run's settings stay."""

import pytest
import torch
from train_helpers import tiny_overrides

from blip_fast.checkpoint import CheckpointError
from blip_fast.train.checkpointing import list_checkpoints, load_training_checkpoint
from blip_fast.train.config import OptimConfig, load_pretrain_config
from blip_fast.train.optim import build_optimizer, load_optimizer_state
from blip_fast.train.pretraining import pretrain

CPU = torch.device("cpu")


def stepped(config: OptimConfig, capturable: bool = False, steps: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, config, CPU, capturable=capturable)
    for _ in range(steps):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_a_graphed_run_keeps_its_capturable_optimizer_when_loading_an_eager_checkpoint():
    """An eager run's state (capturable False, rates as numbers) loaded for a CUDA graph: the flag and the rate tensors
    the graph reads stay; torch's load_state_dict alone would bring back capturable=False, and the capture of the
    optimizer step would fail."""
    _, eager = stepped(OptimConfig(init_lr=1e-3))
    assert not eager.param_groups[0]["capturable"]
    _, graphed = stepped(OptimConfig(init_lr=1e-3), capturable=True, steps=0)
    rates = [group["lr"] for group in graphed.param_groups]
    load_optimizer_state(graphed, eager.state_dict())
    assert all(group["capturable"] and group["fused"] for group in graphed.param_groups)
    assert [group["lr"] for group in graphed.param_groups] == rates  # the very tensors
    for mine, theirs in zip(graphed.state.values(), eager.state.values(), strict=True):
        assert torch.equal(mine["exp_avg"], theirs["exp_avg"]) and float(mine["step"]) == float(theirs["step"]) == 2


def test_this_runs_hyperparameters_win_over_the_checkpoints():
    _, old = stepped(OptimConfig(weight_decay=0.05, betas=(0.9, 0.999)))
    _, new = stepped(OptimConfig(weight_decay=0.0, betas=(0.8, 0.99)), steps=0)
    load_optimizer_state(new, old.state_dict())
    assert [(g["weight_decay"], g["betas"]) for g in new.param_groups] == [(0.0, (0.8, 0.99))] * len(new.param_groups)


def test_step_counts_move_between_per_group_and_per_parameter():
    """apex's FusedAdam keeps its step count in the group, torch's AdamW per parameter: either checkpoint loads into
    the other (apex is not needed to build the state it writes)."""
    _, torch_adam = stepped(OptimConfig())
    saved = torch_adam.state_dict()
    apex_like = {"param_groups": [{**g, "step": 2} for g in saved["param_groups"]],
                 "state": {k: {n: v for n, v in s.items() if n != "step"} for k, s in saved["state"].items()}}
    _, fresh = stepped(OptimConfig(), steps=0)
    load_optimizer_state(fresh, apex_like)
    assert all(float(s["step"]) == 2 for s in fresh.state.values())
    assert all("step" not in g for g in fresh.param_groups)

    class GroupSteps(torch.optim.Optimizer):  # keeps its step count per group, as apex's FusedAdam
        pass

    model = torch.nn.Linear(3, 2)
    grouped = GroupSteps([{"params": list(model.parameters()), "weight_decay": 0.0, "lr_scale": 1.0}], {"lr": 1e-3})
    load_optimizer_state(grouped, {"param_groups": [{**saved["param_groups"][0], "params": [0, 1]}],
                                   "state": saved["state"]})
    assert grouped.param_groups[0]["step"] == 2 and grouped.param_groups[0]["weight_decay"] == 0.0


def test_groups_that_do_not_match_are_a_clear_error():
    _, decays_all = stepped(OptimConfig(decay_norms_and_biases=True))
    _, splits = stepped(OptimConfig(decay_norms_and_biases=False), steps=0)
    with pytest.raises(CheckpointError, match="optim.decay_norms_and_biases"):
        load_optimizer_state(splits, decays_all.state_dict())


def test_resume_trains_with_the_new_settings_and_records_them(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.max_steps=2")),
             printer=lambda *_: None)
    pretrain(load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.max_steps=3",
                                                       "optim.weight_decay=0.0")),
             resume=True, printer=lambda *_: None)
    final = load_training_checkpoint(list_checkpoints(out)[-1])
    assert final["progress"]["step"] == 3
    assert {g["weight_decay"] for g in final["optimizer"]["param_groups"]} == {0.0}  # temperature group: 0 anyway
    assert final["config"]["optim"]["weight_decay"] == 0.0
