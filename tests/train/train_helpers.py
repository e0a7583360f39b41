"""Shared by the engine tests."""

def tiny_overrides(synthetic_dir, out, *extra):
    """The tiny-synthetic config shrunk for tests: batch 8, no workers, no TensorBoard, no evaluation."""
    return [f"data.synthetic_dir={synthetic_dir}", "data.synthetic_n=600", "data.batch_size=8", "data.num_workers=0",
            f"train.out={out}", "train.tensorboard=false", "train.eval_size=0", "train.log_every=2",
            "optim.warmup_steps=3", *extra]
