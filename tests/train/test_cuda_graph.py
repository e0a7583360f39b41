"""The optimizer step replayed as a CUDA graph (blip_fast.train.cuda_graph) equals the eager step."""

import copy
import json

import pytest
import torch
from train_helpers import synthetic_step_batch, tiny_overrides

import blip_fast.train.pretraining as pretraining
from blip_fast import ops
from blip_fast.config import tiny_config
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.train import cuda_graph
from blip_fast.train.checkpointing import list_checkpoints, load_training_checkpoint
from blip_fast.train.config import OptimConfig, load_pretrain_config
from blip_fast.train.cuda_graph import CudaGraphStep
from blip_fast.train.optim import build_optimizer, set_learning_rate
from blip_fast.train.pretraining import pretrain
from blip_fast.train.step import optimizer_step


def labelled(label: str):
    """An ``assert_close`` message: the label, then torch's account of the mismatch (how many, how far)."""
    return lambda message: f"{label}: {message}"


def test_capturable_learning_rates_are_written_in_place():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig(init_lr=1e-3), torch.device("cpu"), capturable=True)
    rates = [group["lr"] for group in optimizer.param_groups]
    assert all(isinstance(rate, torch.Tensor) for rate in rates)
    set_learning_rate(optimizer, 5e-4)
    assert [group["lr"] for group in optimizer.param_groups] == rates  # the same tensors, which a graph reads
    assert all(float(group["lr"]) == pytest.approx(5e-4 * group["lr_scale"]) for group in optimizer.param_groups)
    optimizer.param_groups[0]["lr"] = 1e-3  # as after loading a checkpoint of a run without graphs
    set_learning_rate(optimizer, 2e-4)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(2e-4)


def test_refuses_a_model_off_the_gpu():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"), capturable=True)
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphStep(model, optimizer, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout, precision, packed, impl", [
    (0.0, "fp32", False, "auto"), (0.1, "fp32", False, "auto"), (0.0, "bf16", False, "auto"),
    (0.0, "fp32", True, "auto"), (0.1, "bf16", True, "auto"),
    (0.1, "fp32", True, "auto,varlen_attention=triton,varlen_cross_attention=triton")])
def test_graph_replay_equals_the_eager_step(dropout, precision, packed, impl):
    with ops.impl_scope(impl):  # the last case: the packed attention kernel, its dropout seed drawn in the graph
        replay_equals_eager(dropout, precision, packed)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_graph_replay_with_gradient_accumulation_equals_the_eager_step(packed):
    """Two micro-batches a step: one graph per combination of their shapes, in order."""
    replay_equals_eager(0.1, "fp32", packed, micro_batches=2)


@pytest.mark.gpu
def test_shapes_past_the_graph_cap_run_eagerly_and_alike(monkeypatch):
    """Past MAX_GRAPHS captured graphs, new shapes run eagerly at every step, and still train as eager steps."""
    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 1)
    graph_step = replay_equals_eager(0.0, "fp32", False)
    (captured,) = graph_step.graphs  # the first shape to come twice: batch 0's (steps 0 and 1)
    batches = [synthetic_step_batch(8, seed, "cuda", length) for seed, length in REPLAY_BATCHES]
    comes = sum((CudaGraphStep.key(batches[which]),) == captured for which in REPLAY_ORDER)
    assert graph_step.eager_steps == len(REPLAY_ORDER) - (comes - 1)  # all but its replays


REPLAY_BATCHES = ((0, 30), (1, 12), (2, 30), (3, 12))  # (seed, longest caption)
REPLAY_ORDER = (0, 0, 1, 2, 1, 3, 2, 0)


def replay_equals_eager(dropout, precision, packed, micro_batches=1):
    """Eight steps over batches of two caption lengths (one eager step, a capture, then replays for each; packed, each
    with its own token count too), with a changing learning rate and alpha: losses each step and all weights,
    momentum weights and queues at the end equal those of eager steps (fp32 within 1e-5 relative, 1e-6 absolute;
    bf16 within 1e-3 relative, 1e-4 absolute). The eager step runs with autocast's cache off, as the graph must: with
    the cache, a weight used by several passes is cast once and its gradients are summed in bf16, without it each
    use's gradient is cast to fp32 first, which changes the sums by bf16 roundings (seen on the H100). With dropout on,
    the default generator's random numbers must also advance per replay as they do eagerly. ``micro_batches`` 2: each
    step also takes the batch after its own, so the steps' shape combinations repeat as well. Returns the graphed
    step."""
    device = torch.device("cuda")
    config = tiny_config()
    config.text.hidden_dropout = config.text.attention_dropout = dropout
    torch.manual_seed(0)
    eager_model = BlipPretrain(config).to(device).train()
    graph_model = copy.deepcopy(eager_model)
    optim = OptimConfig(clip_grad_norm=1.0)
    eager_opt = build_optimizer(eager_model, optim, device, capturable=True)
    graph_opt = build_optimizer(graph_model, optim, device, capturable=True)
    eager_gen = torch.Generator(device=device).manual_seed(1)
    graph_gen = torch.Generator(device=device).manual_seed(1)
    graph_step = CudaGraphStep(graph_model, graph_opt, graph_gen, precision, clip_grad_norm=1.0)
    rtol, atol = (1e-5, 1e-6) if precision == "fp32" else (1e-3, 1e-4)
    batches = [synthetic_step_batch(8, seed, device, max_length, pack_multiple=8 if packed else None)
               for seed, max_length in REPLAY_BATCHES]
    assert len({batch.input_ids.shape[1] for batch in batches}) >= 2  # captions of several lengths
    for index, which in enumerate(REPLAY_ORDER):
        lr, alpha = 1e-4 * (index + 1), 0.05 * index
        torch.manual_seed(100 + index)
        torch.cuda.manual_seed(100 + index)
        set_learning_rate(eager_opt, lr)
        step_batches = [batches[(which + i) % len(batches)] for i in range(micro_batches)]
        eager = optimizer_step(eager_model, eager_opt, step_batches, alpha, eager_gen, precision, 1.0,
                               autocast_cache=False)
        torch.cuda.manual_seed(100 + index)
        set_learning_rate(graph_opt, lr)
        graphed = graph_step(step_batches, alpha)
        torch.testing.assert_close(graphed, eager, rtol=rtol, atol=atol, msg=labelled(f"losses of step {index}"))
    assert len(graph_step.graphs) >= min(2, cuda_graph.MAX_GRAPHS)  # both caption lengths captured and replayed
    for (name, a), (_, b) in zip(eager_model.state_dict().items(), graph_model.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=labelled(name))
    return graph_step


@pytest.mark.gpu
def test_pretraining_with_graphs_equals_eager_and_resumes(synthetic_dir, tmp_path, monkeypatch):
    """``blip-fast pretrain`` with ``train.cuda_graph``: 12 steps equal 12 eager steps, and 6 + resume + 6 equal
    12 (fp32 on the GPU; losses logged every 2 steps and final weights within 1e-5 relative). Captions of each
    new length run eagerly once, so the run mixes eager steps, captures and replays. The eager run packs its
    captions to the graphed run's token multiple: the gradient of a key projection's bias is zero but for rounding,
    which the GEMMs' shapes change, and Adam's first steps turn its sign into a full learning-rate step."""
    monkeypatch.setattr(pretraining, "PACKED_TOKENS_MULTIPLE", pretraining.PACKED_TOKENS_MULTIPLE_GRAPHED)
    def run(out, steps, graph, resume=False):
        config = load_pretrain_config(None, tiny_overrides(synthetic_dir, out, "train.device=cuda",
                                                           f"train.max_steps={steps}", f"train.cuda_graph={graph}"))
        pretrain(config, resume=resume, printer=lambda *_: None)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    eager = run(tmp_path / "eager", 12, "false")
    graphed = run(tmp_path / "graphed", 12, "true")
    run(tmp_path / "halves", 6, "true")
    halves = run(tmp_path / "halves", 12, "true", resume=True)
    keys = ("loss_itc", "loss_itm", "loss_lm", "lr", "alpha")
    for other in (graphed, halves):
        assert [r["step"] for r in other] == [r["step"] for r in eager]
        for a, b in zip(eager, other, strict=True):
            assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-5, abs=1e-6), a["step"]
    final = {name: load_training_checkpoint(list_checkpoints(tmp_path / name)[-1])["model"]
             for name in ("eager", "graphed", "halves")}
    for name, tensor in final["eager"].items():
        for other in ("graphed", "halves"):
            torch.testing.assert_close(final[other][name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=labelled(f"{other}: {name}"))


def test_a_graph_is_fixed_to_every_tensor_field_of_the_batch_but_not_its_values():
    from types import SimpleNamespace

    def batch(ids, captions=9, **extra):
        return SimpleNamespace(images=torch.zeros(4, 3, 8, 8), input_ids=torch.zeros(4, captions, dtype=torch.long),
                               attention_mask=torch.ones(4, captions, dtype=torch.long), packing=None,
                               keys=[str(i) for i in ids], img_ids=torch.tensor(ids), **extra)

    key = CudaGraphStep.key
    assert key(batch([0, 1, 2, 3])) == key(batch([5, 5, 6, 7]))   # new ids and sample keys: a replay
    assert key(batch([0, 1, 2, 3])) != key(batch([0, 1, 2, 3], captions=10))
    assert key(batch([0, 1, 2, 3])) != key(batch([0, 1, 2]))       # another batch size of ids
    with_ids = batch([0, 1, 2, 3])
    without = batch([0, 1, 2, 3])
    without.img_ids = None
    assert key(with_ids) != key(without)


@pytest.mark.gpu
def test_retrieval_graph_replay_copies_the_image_ids_and_equals_eager():
    """Retrieval fine-tuning's step (image ids decide ITC's positives and ITM's excluded negatives) replayed over
    batches whose ids differ: losses and weights equal eager steps (fp32, 1e-5 relative, 1e-6 absolute)."""
    from types import SimpleNamespace

    from blip_fast.models.blip_retrieval import BlipRetrieval
    from blip_fast.train.retrieval import RetrievalTrainer

    device = torch.device("cuda")
    config = tiny_config()
    config.queue_size = 64
    torch.manual_seed(0)
    eager_model = BlipRetrieval(config).to(device).train()
    graph_model = copy.deepcopy(eager_model)
    optim = OptimConfig()
    eager_opt = build_optimizer(eager_model, optim, device, capturable=True)
    graph_opt = build_optimizer(graph_model, optim, device, capturable=True)
    eager_gen = torch.Generator(device=device).manual_seed(1)
    graph_step = CudaGraphStep(graph_model, graph_opt, torch.Generator(device=device).manual_seed(1), "fp32",
                               forward=RetrievalTrainer.forward)
    batches = []
    for seed, ids in enumerate(([0, 0, 1, 1, 2, 2, 3, 3], [4, 5, 6, 7, 8, 9, 10, 11], [1, 1, 1, 1, 2, 2, 2, 2])):
        step = synthetic_step_batch(8, seed, device, 12)
        batches.append(SimpleNamespace(**vars(step), img_ids=torch.tensor(ids, device=device)))
    for index, which in enumerate([0, 0, 1, 2, 0, 1]):
        set_learning_rate(eager_opt, 1e-4)
        eager = optimizer_step(eager_model, eager_opt, [batches[which]], 0.4, eager_gen, "fp32", 0.0,
                               autocast_cache=False, forward=RetrievalTrainer.forward)
        set_learning_rate(graph_opt, 1e-4)
        graphed = graph_step([batches[which]], 0.4)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6, msg=labelled(f"losses of step {index}"))
    assert len(graph_step.graphs) == 1
    for (name, a), (_, b) in zip(eager_model.state_dict().items(), graph_model.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=labelled(name))
