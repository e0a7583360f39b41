"""BLIP's tensor shapes, named once: the parity cases of ``blip_fast/ops``, the benchmarks and the tests take the
shapes they measure from here, so that a benchmark times what a test checks.

The models are the paper's (Li et al., 2022, section 4.1): ViT-B/16 or ViT-L/16 for images, BERT-base for text,
pretrained at 224 px and fine-tuned at 384 px. The presets of :mod:`blip_fast.config` build the same shapes
(tests/test_shapes.py compares them); a model is configured there, not here.
"""

PATCH_SIZE = 16
PRETRAIN_IMAGE_SIZE = 224
FINETUNE_IMAGE_SIZE = 384
IMAGE_TOKENS_224 = 197  # [CLS] + (224 / 16)^2 patches, ViT-B/16 and ViT-L/16 alike
IMAGE_TOKENS_384 = 577  # [CLS] + (384 / 16)^2

HEAD_DIM = 64  # of every attention in both models
BASE_WIDTH, BASE_HEADS = 768, 12  # ViT-B/16, and BERT-base: the text transformer of the base and the large model
LARGE_WIDTH, LARGE_HEADS = 1024, 16  # ViT-L/16
VOCAB_SIZE = 30524  # BERT uncased and BLIP's [DEC], [ENC]

PRETRAIN_TEXT_LENGTH = 30  # tokens per caption in pretraining (and captioning)
FINETUNE_TEXT_LENGTH = 35  # retrieval captions and VQA questions

EMBED_DIM = 256  # the ITC projections
QUEUE_SIZE = 57600  # the momentum feature queue
PRETRAIN_BATCH = 96  # images per GPU in the pretraining step docs/benchmarks.md measures, the original's and ours
