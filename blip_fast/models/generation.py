"""Autoregressive decoding for the image-grounded text decoder.

BLIP captions with beam search (3 beams) or nucleus sampling (top-p 0.9, repetition penalty 1.1)
through Hugging Face's ``generate``, which also applies its default top-k 50 when sampling; VQA
answers with beam search. Both keep a key/value cache: the context's cross-attention keys/values
are computed once, each step feeds one token.

The decoding rules are Hugging Face's, so that the same weights give the same captions:

* greedy / sampling stop a row at [SEP] (then pad it), stop the batch when every row stopped
  or ``max_length`` (prompt included) is reached;
* ``min_length`` forbids [SEP] while the sequence is shorter; the repetition penalty divides
  positive (multiplies negative) scores of tokens already in the sequence;
* sampling first keeps the ``top_k`` highest scores (every token tied with the k-th one too),
  then, of those, the smallest set of tokens whose probability reaches ``top_p`` (at least one);
* beam search keeps ``2 * num_beams`` candidates a step, finishes a hypothesis on [SEP] or at
  ``max_length`` with score ``sum log p / generated_length ** length_penalty``, and stops a
  batch item when no running beam can beat its worst finished one (``early_stopping=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .med import KVCache, TextDecoder

STRATEGIES = ("greedy", "beam", "nucleus")
DECODE_STEPS = ("dynamic", "static", "cuda_graph")
_NEG = -1.0e9


@dataclass
class GenerationConfig:
    strategy: str = "beam"
    """greedy | beam | nucleus."""
    max_length: int = 30
    """Longest output in tokens, prompt included."""
    min_length: int = 10
    """Shortest output in tokens, prompt included ([SEP] is forbidden before)."""
    num_beams: int = 3
    """Beams for ``beam``."""
    top_k: int = 50
    """Most likely tokens ``nucleus`` samples from, cut before ``top_p``; 0: no cut. 50 is Hugging
    Face's default, which BLIP's sampling got without asking for it."""
    top_p: float = 0.9
    """Nucleus mass for ``nucleus``."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating tokens (BLIP uses 1.1 with nucleus sampling)."""
    length_penalty: float = 1.0
    """Exponent of the length normalisation of finished beams."""
    num_return_sequences: int = 1
    """Captions ``nucleus`` samples per image (rows come image by image); the image's context is held once for
    all of them."""
    decode_step: str = "dynamic"
    """How the one-token steps after the prompt run: ``dynamic`` attends to the tokens cached so far; ``static``
    attends to every slot of the preallocated cache with the ones not yet written masked, the position a device
    tensor, so that every step has the same shapes and buffers; ``cuda_graph`` captures that static step once
    per call as a CUDA graph and replays it (CUDA only). The three compute the same scores up to rounding."""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if self.max_length < 1 or self.min_length < 0 or self.num_beams < 1:
            raise ValueError("max_length >= 1, min_length >= 0 and num_beams >= 1 are required")
        # both count the prompt: a minimum past the maximum could never be met
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length}); "
                             "both count the prompt's tokens")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k cut); got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive; got {self.repetition_penalty}")
        if isinstance(self.num_return_sequences, bool) or not isinstance(self.num_return_sequences, int) \
                or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an int >= 1; got {self.num_return_sequences!r}")
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {', '.join(DECODE_STEPS)}; got {self.decode_step!r}")
        if self.num_return_sequences > 1 and self.strategy != "nucleus":
            raise ValueError(f"num_return_sequences > 1 needs strategy='nucleus' ({self.strategy} gives one "
                             "sequence per image)")


def _process(scores: torch.Tensor, sequences: torch.Tensor, config: GenerationConfig, eos: int) -> torch.Tensor:
    """Repetition penalty and minimum length on next-token scores (N, V) given sequences (N, L)."""
    if config.repetition_penalty != 1.0:
        seen = torch.gather(scores, 1, sequences)
        seen = torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        scores = scores.scatter(1, sequences, seen)
    if sequences.shape[1] < config.min_length:
        scores = scores.clone()
        scores[:, eos] = float("-inf")
    return scores


def _top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    # HF's TopKLogitsWarper: drop scores below the k-th largest, so ties with it all survive
    kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    ascending, order = torch.sort(scores, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[:, -1] = False  # keep at least the most likely token
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def check_prompt(prompt_ids: torch.Tensor, config: GenerationConfig) -> None:
    """Clear errors for a prompt that decoding cannot start from or cannot extend."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.is_floating_point() \
            or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
        what = f"{prompt_ids.dtype} tensor of shape {tuple(prompt_ids.shape)}" \
            if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise ValueError(f"prompt_ids must be a 2-D integer tensor (B, P); got a {what}")
    # decoding feeds the last prompt token first: with none there is nothing to condition on
    if prompt_ids.shape[1] < 1:
        raise ValueError("prompt_ids must hold at least one token per row (the [DEC] start token); "
                         f"got shape {tuple(prompt_ids.shape)}")
    # max_length counts the prompt: at or below its length no token could be generated
    if prompt_ids.shape[1] >= config.max_length:
        raise ValueError(f"max_length ({config.max_length}) must exceed the prompt length "
                         f"({prompt_ids.shape[1]} tokens), since it counts the prompt")


def _sampling_filter(scores: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Scores (N, V) with the tokens nucleus sampling may not pick set to -inf."""
    if config.top_k:  # HF's warper order: top-k, then top-p on what is left
        scores = _top_k_filter(scores, config.top_k)
    return _top_p_filter(scores, config.top_p)


@torch.no_grad()
def generate(
    decoder: TextDecoder,
    prompt_ids: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor | None,
    config: GenerationConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode after ``prompt_ids`` (B, P) attending to ``context`` (B, N, width).

    Returns token ids (B * num_return_sequences, L <= max_length), prompt included, padded with ``pad_token_id``.
    """
    check_prompt(prompt_ids, config)
    if prompt_ids.shape[0] != context.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompts for {context.shape[0]} contexts")
    if config.decode_step == "cuda_graph" and context.device.type != "cuda":
        raise ValueError(f"decode_step='cuda_graph' needs CUDA; the context is on {context.device}")
    decoder.bert.embeddings.check_length(config.max_length)  # the cache's slots are positions
    if config.strategy == "beam":
        return _beam_search(decoder, prompt_ids, context, context_mask, config, eos_token_id, pad_token_id)
    return _sample_or_greedy(decoder, prompt_ids, context, context_mask, config, eos_token_id, pad_token_id,
                             generator)


def _next_scores(decoder, step_ids, context, context_mask, cache) -> torch.Tensor:
    hidden = decoder.hidden_states(step_ids, None, context, context_mask, cache=cache)[:, -1]
    return decoder.logits(hidden).float()  # (N, V)


class _DecodeSteps:
    """The decoder's next-token scores (N, V), step by step: the prompt's step as it comes (its length varies),
    then each one-token step as ``decode_step`` says (GenerationConfig). A graph's output is overwritten by the
    next replay: the loops read each step's scores before taking the next."""

    def __init__(self, decoder, context, context_mask, cache: KVCache, decode_step: str):
        self.decoder, self.context, self.context_mask, self.cache = decoder, context, context_mask, cache
        self.decode_step = decode_step
        self.graph = self.graph_ids = self.graph_scores = None

    def __call__(self, step_ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if self.decode_step == "dynamic" or cache.length == 0:
            return _next_scores(self.decoder, step_ids, self.context, self.context_mask, cache)
        if cache.position is None:
            cache.position = torch.zeros((), dtype=torch.long, device=step_ids.device)
        cache.position.fill_(cache.length)
        if self.decode_step == "static":
            scores = _next_scores(self.decoder, step_ids, self.context, self.context_mask, cache)
        else:
            if self.graph is None:
                self._capture(step_ids)
            self.graph_ids.copy_(step_ids)
            self.graph.replay()
            scores = self.graph_scores
        cache.length += 1
        return scores

    def _capture(self, step_ids: torch.Tensor) -> None:
        """Capture the static step on its first use. Its warm-up runs write this step's slot, which the replay
        then writes again; the context's keys/values and the cache buffers keep their addresses for the call."""
        self.graph_ids = step_ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation and backend choices happen outside the capture
                _next_scores(self.decoder, self.graph_ids, self.context, self.context_mask, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_scores = _next_scores(self.decoder, self.graph_ids, self.context, self.context_mask,
                                             self.cache)


# the loops read a stopping flag back to the host only every this many tokens: a read waits for the device
# to finish every step queued so far. Steps past the end leave the output as it is (ended rows add padding;
# a beam search item that cannot improve keeps its finished set), so only the saved work depends on it.
CHECK_EVERY = 4


def _sample_or_greedy(decoder, prompt_ids, context, context_mask, config, eos, pad, generator):
    samples = config.num_return_sequences
    cache = KVCache.empty(len(decoder.bert.encoder.layer), config.max_length, shared_by=samples)
    steps = _DecodeSteps(decoder, context, context_mask, cache, config.decode_step)
    sequences = prompt_ids.repeat_interleave(samples, dim=0)
    running = torch.ones(sequences.shape[0], dtype=torch.bool, device=prompt_ids.device)
    needed = torch.zeros((), dtype=torch.long, device=prompt_ids.device)  # steps taken while a row ran
    step_ids = sequences
    while sequences.shape[1] < config.max_length:
        scores = _process(steps(step_ids), sequences, config, eos)
        if config.strategy == "greedy":
            next_ids = scores.argmax(dim=-1)
        else:
            probs = _sampling_filter(scores, config).softmax(dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        next_ids = torch.where(running, next_ids, torch.full_like(next_ids, pad))
        needed += running.any()
        sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
        running = running & (next_ids != eos)
        if (sequences.shape[1] - prompt_ids.shape[1]) % CHECK_EVERY == 0 and not bool(running.any()):
            break
        step_ids = next_ids[:, None]
    # the steps run after every row had ended are dropped: the output of stopping at the last row's end
    return sequences[:, :prompt_ids.shape[1] + int(needed)]


def _gather_beams(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` (B, K, ...) picked along dim 1 by ``index`` (B, K')."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.gather(tensor, 1, index.expand(*index.shape[:2], *tensor.shape[2:]))


def _beam_search(decoder, prompt_ids, context, context_mask, config, eos, pad):
    batch, prompt_len = prompt_ids.shape
    beams, device = config.num_beams, prompt_ids.device
    keep = 2 * beams  # candidates per step: enough that `beams` of them are still running
    # the context stays one row per image: its keys/values are computed once and shared by the image's beams
    cache = KVCache.empty(len(decoder.bert.encoder.layer), config.max_length, shared_by=beams)
    steps = _DecodeSteps(decoder, context, context_mask, cache, config.decode_step)

    running = torch.full((batch, beams, config.max_length), pad, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = prompt_ids[:, None]
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = _NEG  # all beams start identical: let only the first one expand
    finished = running.clone()
    finished_scores = torch.full((batch, beams), _NEG, device=device)
    finished_lengths = torch.full((batch, beams), prompt_len, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    first_beams = torch.arange(keep, device=device) < beams
    batch_offset = torch.arange(batch, device=device)[:, None] * beams

    step_ids = prompt_ids.repeat_interleave(beams, dim=0)
    length = prompt_len
    while length < config.max_length:
        flat = running[:, :, :length].reshape(batch * beams, length)
        scores = torch.log_softmax(steps(step_ids), dim=-1)
        scores = _process(scores, flat, config, eos)
        vocab = scores.shape[-1]
        totals = (scores.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)
        top_scores, top_index = torch.topk(totals, keep, dim=1)  # (B, 2K)
        source = top_index // vocab
        tokens = top_index % vocab
        candidates = _gather_beams(running, source)
        candidates[:, :, length] = tokens
        stops = (tokens == eos) | (length + 1 >= config.max_length)

        # the best `beams` candidates that did not stop keep running
        running_candidates = top_scores + stops.float() * _NEG
        chosen = torch.topk(running_candidates, beams, dim=1).indices
        running = _gather_beams(candidates, chosen)
        running_scores = _gather_beams(running_candidates, chosen)
        cache.reorder((_gather_beams(source, chosen) + batch_offset).view(-1))

        # stopped candidates among the top `beams` enter the finished set, length-normalised
        ended = stops & first_beams[None]
        ended_scores = top_scores / float(length + 1 - prompt_len) ** config.length_penalty
        ended_scores = ended_scores + (~ended).float() * _NEG + (~improvable).float() * _NEG
        merged = torch.topk(torch.cat([finished_scores, ended_scores], dim=1), beams, dim=1).indices
        finished = _gather_beams(torch.cat([finished, candidates], dim=1), merged)
        finished_scores = _gather_beams(torch.cat([finished_scores, ended_scores], dim=1), merged)
        finished_lengths = _gather_beams(
            torch.cat([finished_lengths, torch.full_like(stops, length + 1, dtype=torch.long)], dim=1), merged)
        is_finished = _gather_beams(torch.cat([is_finished, ended], dim=1), merged)

        length += 1
        # can a running beam still beat the worst finished one? (early_stopping=False heuristic)
        best_running = running_scores[:, :1] / float(length - prompt_len) ** config.length_penalty
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values,
                                     torch.full_like(finished_scores, _NEG))
        improvable = improvable & (best_running > worst_finished).any(dim=1, keepdim=True)
        if (length - prompt_len) % CHECK_EVERY == 0 and not bool(improvable.any()):
            break
        step_ids = running[:, :, length - 1].reshape(batch * beams, 1)

    best = finished[:, 0]
    return best[:, : int(finished_lengths[:, 0].max())]
