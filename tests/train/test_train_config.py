"""Pretraining configs: shipped YAML files load, overrides apply, mistakes are named."""

from types import SimpleNamespace

import pytest

from blip_fast.config import ConfigError
from blip_fast.shapes import QUEUE_SIZE
from blip_fast.train.config import SHIPPED, OptimConfig, load_pretrain_config, parse_override
from blip_fast.train.optim import parameter_groups
from blip_fast.train.schedule import distillation_alpha, learning_rate


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load(name):
    config = load_pretrain_config(name, ["data.paths=[a.json]"] if name != "tiny-synthetic" else [])
    model = config.model_config()
    assert model.vision.image_size == config.data.transform.image_size
    assert model.queue_size == (QUEUE_SIZE if name != "tiny-synthetic" else 96)


def test_base_config_is_the_original_pretrain_yaml():
    config = load_pretrain_config("base", ["data.paths=[a.json]"])
    o = config.optim
    assert (o.init_lr, o.min_lr, o.warmup_lr, o.warmup_steps, o.lr_decay_rate, o.weight_decay) == \
        (3e-4, 1e-6, 1e-6, 3000, 0.9, 0.05)
    assert (config.data.batch_size, config.train.epochs, config.train.seed) == (75, 20, 42)
    assert config.model_config().alpha == 0.4 and config.model_config().momentum == 0.995
    assert config.data.transform.scale == (0.2, 1.0) and config.data.transform.randaugment


def test_overrides_are_typed_and_nested():
    config = load_pretrain_config(None, ["optim.init_lr=2e-4", "data.batch_size=16", "model.text.num_layers=3",
                                         "train.max_steps=7", "data.transform.image_size=32"])
    assert config.optim.init_lr == 2e-4 and config.data.batch_size == 16 and config.train.max_steps == 7
    assert config.model_config().text.num_layers == 3
    assert config.model_config().vision.image_size == 32
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1", "unknown key(s) in optim: learning_rate"),
    ("data.batch_size=big", "data.batch_size must be int"),
    ("model.vision.depth=two", "model.vision.depth must be int"),
    ("model.dropout=0.1", "unknown key model.dropout"),
    ("train.precision=fp8", "train.precision must be fp32 or bf16"),
    ("data.batch_size=1", "at least 2"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("data.paths=a.json", "data.paths must be a list"),
    ("nonsense", "must look like section.key=value"),
    ("data.paths=[a/{0..3}.tar]", "quote strings with braces"),
    ("data.paths=[a.json]", "data.paths is read with data.kind=json or data.kind=shards"),  # default: synthetic
])
def test_mistakes_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_pretrain_config(None, [override])


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor one of the shipped"):
        load_pretrain_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pretrain_config(str(bad))
    with pytest.raises(ConfigError, match="needs data.paths"):
        load_pretrain_config("base")


def test_learning_rate_follows_the_original_schedule():
    o = load_pretrain_config("base", ["data.paths=[a.json]"]).optim
    assert learning_rate(o, 0, 0, 20) == pytest.approx(1e-6)
    assert learning_rate(o, 0, 1500, 20) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)
    assert learning_rate(o, 0, 3000, 20) == pytest.approx(3e-4)
    assert learning_rate(o, 0, 9000, 20) == pytest.approx(3e-4)
    assert learning_rate(o, 1, 0, 20) == pytest.approx(3e-4 * 0.9)
    assert learning_rate(o, 5, 123, 20) == pytest.approx(3e-4 * 0.9 ** 5)
    assert learning_rate(o, 500, 0, 20) == pytest.approx(1e-6)  # the floor


def test_fine_tuning_learning_rate_is_the_original_cosine_per_epoch():
    # the original's cosine_lr_schedule(optimizer, epoch, max_epoch=6, init_lr=1e-5, min_lr=0) as in
    # train_retrieval.py: lr = (init_lr - min_lr) * 0.5 * (1 + cos(pi * epoch / max_epoch)) + min_lr
    o = OptimConfig(init_lr=1e-5, min_lr=1e-9, warmup_steps=0, schedule="cosine")
    assert learning_rate(o, 0, 0, 6) == pytest.approx(1e-5)
    assert learning_rate(o, 0, 777, 6) == pytest.approx(1e-5)  # constant within an epoch
    assert learning_rate(o, 3, 0, 6) == pytest.approx(1e-9 + (1e-5 - 1e-9) * 0.5)
    assert learning_rate(o, 2, 5, 6) == pytest.approx(1e-9 + (1e-5 - 1e-9) * 0.5 * (1 + 0.5))  # cos(pi/3) = 0.5
    with pytest.raises(ConfigError, match="optim.schedule must be step or cosine"):
        OptimConfig(schedule="linear")


def test_alpha_ramps_over_two_epochs():
    assert distillation_alpha(0.4, 0, 0, 100, 2.0) == 0.0
    assert distillation_alpha(0.4, 0, 50, 100, 2.0) == pytest.approx(0.1)
    assert distillation_alpha(0.4, 1, 50, 100, 2.0) == pytest.approx(0.3)
    assert distillation_alpha(0.4, 2, 0, 100, 2.0) == pytest.approx(0.4)
    assert distillation_alpha(0.4, 7, 3, 100, 2.0) == pytest.approx(0.4)


def test_parameter_groups_original_and_lavis():
    from blip_fast.config import tiny_config
    from blip_fast.models.blip_pretrain import BlipPretrain

    model = BlipPretrain(tiny_config())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    original = load_pretrain_config(None, ["optim.temp_lr=null"]).optim
    groups = parameter_groups(model, original)
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == trainable
    lavis = load_pretrain_config(None, ["optim.decay_norms_and_biases=false"]).optim
    groups = {g["name"]: g for g in parameter_groups(model, lavis)}
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert all(p.ndim < 2 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0
    assert groups["temperature"]["params"] == [model.temp]
    assert groups["temperature"]["lr_scale"] == pytest.approx(1e-4 / 1e-3)
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)


def resolve_cuda_graph(setting, *overrides, device="cuda", ranks=1, graphs_step=True):
    """The trainer's resolution of ``train.cuda_graph`` for a run on ``device`` with ``ranks`` processes (no GPU
    needed: nothing is built), and what it prints."""
    import torch

    from blip_fast.train.distributed import DistributedContext
    from blip_fast.train.engine import Trainer

    printed = []
    ctx = DistributedContext(world_size=ranks, device=torch.device(device),
                             data_parallel="ddp" if ranks > 1 else "none")
    trainer = SimpleNamespace(device=torch.device(device), ctx=ctx, graphs_step=graphs_step, task_name="pretraining",
                              printer=printed.append)
    config = load_pretrain_config(None, [f"train.cuda_graph={setting}", *overrides])
    return Trainer._resolve_cuda_graph(trainer, config).train.cuda_graph, printed


def test_cuda_graph_auto_is_on_where_it_has_run_and_says_why_not_elsewhere():
    assert resolve_cuda_graph("auto") == (True, [])
    assert resolve_cuda_graph("auto", device="cpu") == (False, [])          # nothing to say off a GPU
    assert resolve_cuda_graph("false") == (False, [])
    assert resolve_cuda_graph("true") == (True, [])
    on, printed = resolve_cuda_graph("auto", "optim.grad_accum_steps=2", "train.activation_checkpointing=true")
    assert not on and printed == ["train.cuda_graph=auto: off (gradient accumulation; activation checkpointing); "
                                  "train.cuda_graph=true tries it"]
    on, printed = resolve_cuda_graph("auto", graphs_step=False)
    assert not on and "pretraining's step has not been replayed on a GPU" in printed[0]
    on, printed = resolve_cuda_graph("auto", ranks=2)
    assert not on and printed == ["train.cuda_graph=auto: off (one process (this run has 2: collectives stay outside "
                                  "graphs))"]
    assert resolve_cuda_graph("true", "optim.grad_accum_steps=2", "train.activation_checkpointing=true") == (True, [])
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true needs one process \(this run has 2"):
        resolve_cuda_graph("true", ranks=2)
    with pytest.raises(ConfigError, match="torch's fused AdamW"):
        resolve_cuda_graph("true", "optim.fused=foreach")
