"""BLIP's image-text contrastive (ITC) loss over the momentum queue: Triton kernels and host functions.

The loss (paper section 3.2, ``models/blip_pretrain.py``; the reference is
:func:`blip_fast.ops.losses.itc_loss_ref`): for each direction -- image->text with queries ``q`` the
online image features, ``q_m`` their momentum twins and keys the momentum text features followed by the
text queue; text->image the other way round -- and each row ``i``::

    s_j   = q_i . k_j / temp        s_m,j = q_m,i . k_j / temp        (j over B_k batch keys + Q queue)
    t_j   = alpha softmax(s_m)_j + (1 - alpha) gt_j / c_i              (gt: the positives, c_i of them)
    loss_i = logsumexp(s) - sum_j t_j s_j
    dloss_i / ds_j = softmax(s)_j - t_j

and the loss is the mean of both directions' rows. Written plainly (the reference) that is, per direction,
(B, B_k + Q) fp32 matrices -- 22 MB each at B = 96, Q = 57,600 -- of the logits, the momentum logits, their
softmaxes, the log-softmax and its gradient, each written to memory and read back, for one number.

Here each row streams over the keys in tiles, as flash-attention over its keys, with two online
softmaxes (of ``s`` and of ``s_m``) sharing every key tile:

* ``forward`` -- the grid is (row blocks, column splits): each program keeps, per row, the running max
  and sum of both softmaxes, ``sum exp(s - m) s`` (for the temperature's gradient), ``sum exp(s_m - m_m)
  s`` (the distillation target's share of ``sum t s``), and the sum of ``s`` over the positives and
  their count; it writes them per split. The in-batch block of ``s`` (B, B_k), from which ITM's hard
  negatives are drawn, is written on the way. Splitting the columns gives the GPU enough programs at
  BLIP's 96 rows (split-K, as flash-decoding).
* ``combine`` -- one program merges the splits of both directions into each row's two softmaxes' max and
  log-sum and ``1 / c``, the loss and ``d loss / d temp = -(sum p s - sum t s) / temp`` averaged: the temperature's
  gradient is known after the forward.
* ``gradients`` -- the same grid recomputes ``s`` and ``s_m`` per tile, turns them into ``softmax(s) -
  t`` with the saved maxima and log-sums and multiplies by the key tile: each split's share of ``d loss / d q``
  (fp32), which the host sums over splits (deterministic; no atomics).

Only the online features and the temperature get gradients: the keys are momentum features and the
queue, made without gradient in the original as in the reference.

Positives: without image ids, row ``i``'s positive is batch key ``offset + i``; with ids (retrieval
fine-tuning), every key whose id equals the row's. Keys are read from two places -- the (B_k, D) batch
features and the (D, Q) queue, in its stored layout, each tile masked to its part -- so the queue is never
copied. Matrix products take the queries' dtype (the key tiles are cast to it in registers); fp32 runs in
IEEE precision, not TF32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import KERNEL_DTYPES, device_scope, dot_precision, sm_count

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package and its CPU paths work without triton
    HAS_TRITON = False

# Per-row statistics each (split, row) writes: max and sum of exp(s - max), sum of exp(s - max) s, the same three
# for s_m (the sum weighting s), sum of s over positives, count of positives.
STATS = 8
# Per-row values the backward reads (per direction): both softmaxes' max and log-sum, 1 / number of positives.
SAVED = 5
# Embedding widths a program holds whole in registers; BLIP's is 256.
MAX_DIM = 1024


@dataclass(frozen=True)
class Tiling:
    """Block sizes and column splits of the forward and gradient grids (``benchmarks/bench_itc_loss.py`` sweeps
    them)."""

    block_m: int = 32
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 2  # column splits are chosen to give about this many programs per SM


# Per compute dtype; read at each call. Shared memory on sm_90 (tests/kernels/test_gpu_compile.py prints it): a key
# tile is 256 rows tall, and the fp32 queue's tiles are staged in fp32 before the cast, so 32 x 32 blocks with 2
# stages take 80 KB in 16-bit (two programs fit an SM's 227 KB), 64 columns 128 KB (one); fp32 products need one
# stage to stay under 100 KB. Not yet timed on a GPU.
DEFAULT_TILINGS = {torch.float16: Tiling(), torch.bfloat16: Tiling(), torch.float32: Tiling(num_stages=1)}


def check_inputs(q, q_m, keys, queue, temp, row_ids, key_ids, queue_ids, offset: int) -> None:
    """Raise ValueError unless one direction's inputs are consistent (shapes, dtypes, devices)."""
    where = "itc_loss"
    if q.dim() != 2 or q_m.shape != q.shape:
        raise ValueError(f"{where}: features and their momentum twins must both be (B, D); got {tuple(q.shape)} "
                         f"and {tuple(q_m.shape)}")
    batch, dim = q.shape
    if keys.dim() != 2 or keys.shape[1] != dim or queue.dim() != 2 or queue.shape[0] != dim:
        raise ValueError(f"{where}: keys must be (B_k, {dim}) and the queue ({dim}, Q); got {tuple(keys.shape)} and "
                         f"{tuple(queue.shape)}")
    if batch < 1 or dim > MAX_DIM:
        raise ValueError(f"{where}: needs 1 <= B and D <= {MAX_DIM}; got B={batch}, D={dim}")
    if not 0 <= offset <= keys.shape[0] - batch:
        raise ValueError(f"{where}: positive offset {offset} puts row B-1 past the {keys.shape[0]} batch keys")
    floats = (q, q_m, keys, queue)
    if any(t.dtype not in KERNEL_DTYPES for t in floats):
        raise ValueError(f"{where}: features and queues must be float32, float16 or bfloat16; got "
                         f"{[str(t.dtype) for t in floats]}")
    if temp.numel() != 1:
        raise ValueError(f"{where}: temp must hold one value; got shape {tuple(temp.shape)}")
    ids = (row_ids, key_ids, queue_ids)
    if any(i is None for i in ids) and not all(i is None for i in ids):
        raise ValueError(f"{where}: image ids are given for all of rows, batch keys and queue, or for none")
    if row_ids is not None and (row_ids.shape != (batch,) or key_ids.shape != (keys.shape[0],)
                                or queue_ids.shape != (queue.shape[1],)):
        raise ValueError(f"{where}: ids must be (B,), (B_k,) and (Q,) = ({batch},), ({keys.shape[0]},), "
                         f"({queue.shape[1]},); got {tuple(row_ids.shape)}, {tuple(key_ids.shape)}, "
                         f"{tuple(queue_ids.shape)}")
    tensors = [t for t in floats + (temp,) + ids if t is not None]
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"{where}: inputs must be on one device")


if HAS_TRITON:

    @triton.jit
    def _query_block(q_ptr, q_m_ptr, temp_ptr, stride_q, stride_q_m, n_rows, dim, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """The program's rows (block ``program_id(0)``) and their mask, the embedding columns and their mask, the
        rows' queries and momentum queries (in the queries' dtype), and 1 / temp."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        d = tl.arange(0, BLOCK_D)
        d_ok = d < dim
        tile = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_q + d[None, :], mask=tile, other=0.0)
        q_m = tl.load(q_m_ptr + rows[:, None] * stride_q_m + d[None, :], mask=tile, other=0.0).to(q.dtype)
        return rows, row_ok, d, d_ok, q, q_m, 1.0 / tl.load(temp_ptr).to(tl.float32)

    @triton.jit
    def _key_tile(keys_ptr, queue_ptr, stride_keys, stride_queue_d, stride_queue_n, cols, d, d_ok, n_keys, n_queue,
                  DTYPE: tl.constexpr):
        """Keys ``cols`` as a (BLOCK_D, BLOCK_N) tile: batch keys below ``n_keys``, queue columns after, 0 past
        the end."""
        in_keys = cols < n_keys
        in_queue = (cols >= n_keys) & (cols < n_keys + n_queue)
        from_keys = tl.load(keys_ptr + cols[None, :] * stride_keys + d[:, None],
                            mask=in_keys[None, :] & d_ok[:, None], other=0.0)
        from_queue = tl.load(queue_ptr + d[:, None] * stride_queue_d + (cols - n_keys)[None, :] * stride_queue_n,
                             mask=in_queue[None, :] & d_ok[:, None], other=0.0)
        return from_keys.to(DTYPE) + from_queue.to(DTYPE)

    @triton.jit
    def _logits(q, q_m, inv_temp, keys_ptr, queue_ptr, stride_keys, stride_queue_d, stride_queue_n, cols, d, d_ok,
                n_keys, n_queue, PRECISION: tl.constexpr):
        """For the key columns ``cols``: which exist (1, BLOCK_N), their tile ``k`` (BLOCK_D, BLOCK_N), and the fp32
        logits of the queries and of their momentum twins against it (BLOCK_M, BLOCK_N)."""
        valid = (cols < n_keys + n_queue)[None, :]
        k = _key_tile(keys_ptr, queue_ptr, stride_keys, stride_queue_d, stride_queue_n, cols, d, d_ok, n_keys, n_queue,
                      q.dtype)
        s = tl.dot(q, k, input_precision=PRECISION) * inv_temp
        s_m = tl.dot(q_m, k, input_precision=PRECISION) * inv_temp
        return valid, k, s, s_m

    @triton.jit
    def _positives(rows, cols, row_ids_ptr, key_ids_ptr, queue_ids_ptr, row_ok, n_keys, n_queue, offset,
                   HAS_IDS: tl.constexpr):
        """(BLOCK_M, BLOCK_N) mask of each row's positive keys among ``cols``."""
        if HAS_IDS:
            row_ids = tl.load(row_ids_ptr + rows, mask=row_ok, other=-1)
            in_keys = cols < n_keys
            in_queue = (cols >= n_keys) & (cols < n_keys + n_queue)
            key_ids = tl.load(key_ids_ptr + cols, mask=in_keys, other=0)
            key_ids = tl.where(in_queue, tl.load(queue_ids_ptr + cols - n_keys, mask=in_queue, other=0), key_ids)
            valid = in_keys | in_queue
            return (row_ids[:, None] == key_ids[None, :]) & valid[None, :] & row_ok[:, None]
        else:
            return (cols[None, :] == (rows + offset)[:, None]) & row_ok[:, None]

    @triton.jit
    def _itc_forward_kernel(
        q_ptr, q_m_ptr, keys_ptr, queue_ptr, temp_ptr, row_ids_ptr, key_ids_ptr, queue_ids_ptr,
        stats_ptr, sim_ptr,
        n_rows, n_keys, n_queue, dim, offset,
        stride_q, stride_q_m, stride_keys, stride_queue_d, stride_queue_n, stride_sim,
        STATS: tl.constexpr, HAS_IDS: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (row block, column split): its rows' partial statistics (``STATS`` per row) and their in-batch
        similarities. The tile loop's trip count is a constexpr: the Triton 3.6 interpreter (the CPU tests)
        cannot take a runtime loop bound with NumPy >= 2.4."""
        split = tl.program_id(1)
        rows, row_ok, d, d_ok, q, q_m, inv_temp = _query_block(q_ptr, q_m_ptr, temp_ptr, stride_q, stride_q_m,
                                                               n_rows, dim, BLOCK_M, BLOCK_D)

        neg_inf = float("-inf")
        run_max = tl.full((BLOCK_M,), neg_inf, tl.float32)
        run_sum = tl.zeros((BLOCK_M,), tl.float32)
        run_ps = tl.zeros((BLOCK_M,), tl.float32)
        m_max = tl.full((BLOCK_M,), neg_inf, tl.float32)
        m_sum = tl.zeros((BLOCK_M,), tl.float32)
        m_ws = tl.zeros((BLOCK_M,), tl.float32)
        pos_sum = tl.zeros((BLOCK_M,), tl.float32)
        pos_count = tl.zeros((BLOCK_M,), tl.float32)
        first = split * TILES_PER_SPLIT * BLOCK_N
        for tile in range(TILES_PER_SPLIT):
            cols = first + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            valid, k, s, s_m = _logits(q, q_m, inv_temp, keys_ptr, queue_ptr, stride_keys, stride_queue_d,
                                       stride_queue_n, cols, d, d_ok, n_keys, n_queue, PRECISION)
            if first + tile * BLOCK_N < n_keys:  # the in-batch block, for ITM's hard negatives
                tl.store(sim_ptr + rows[:, None] * stride_sim + cols[None, :], s,
                         mask=row_ok[:, None] & (cols < n_keys)[None, :])

            # online softmax of s; a row with no valid column yet keeps max -inf, exponents taken from 0 then
            new_max = tl.maximum(run_max, tl.max(tl.where(valid, s, neg_inf), axis=1))
            base = tl.where(new_max == neg_inf, 0.0, new_max)
            e = tl.where(valid, tl.exp(s - base[:, None]), 0.0)
            rescale = tl.exp(run_max - base)
            run_sum = run_sum * rescale + tl.sum(e, axis=1)
            run_ps = run_ps * rescale + tl.sum(e * s, axis=1)
            run_max = new_max
            # online softmax of s_m, weighting s
            new_max = tl.maximum(m_max, tl.max(tl.where(valid, s_m, neg_inf), axis=1))
            base = tl.where(new_max == neg_inf, 0.0, new_max)
            e = tl.where(valid, tl.exp(s_m - base[:, None]), 0.0)
            rescale = tl.exp(m_max - base)
            m_sum = m_sum * rescale + tl.sum(e, axis=1)
            m_ws = m_ws * rescale + tl.sum(e * s, axis=1)
            m_max = new_max

            positive = _positives(rows, cols, row_ids_ptr, key_ids_ptr, queue_ids_ptr, row_ok, n_keys, n_queue,
                                  offset, HAS_IDS)
            pos_sum += tl.sum(tl.where(positive, s, 0.0), axis=1)
            pos_count += tl.sum(positive.to(tl.float32), axis=1)

        out = stats_ptr + split * STATS * n_rows + rows
        tl.store(out, run_max, mask=row_ok)
        tl.store(out + n_rows, run_sum, mask=row_ok)
        tl.store(out + 2 * n_rows, run_ps, mask=row_ok)
        tl.store(out + 3 * n_rows, m_max, mask=row_ok)
        tl.store(out + 4 * n_rows, m_sum, mask=row_ok)
        tl.store(out + 5 * n_rows, m_ws, mask=row_ok)
        tl.store(out + 6 * n_rows, pos_sum, mask=row_ok)
        tl.store(out + 7 * n_rows, pos_count, mask=row_ok)

    @triton.jit
    def _merge(max_ptr, sum_ptr, weighted_ptr, stride_split, rows, row_ok, NUM_SPLITS: tl.constexpr,
               BLOCK_M: tl.constexpr):
        """One online softmax's splits merged, per row: its max, the log of its sum of exp(x - max), and the weighted
        sum / sum. The log-sum-exp stays two numbers: their sum, rounded at the logits' scale (1,000 at temp 0.001),
        would cost ``exp(x - lse)`` digits where ``exp((x - max) - log_sum)`` keeps them, as log_softmax does."""
        neg_inf = float("-inf")
        top = tl.full((BLOCK_M,), neg_inf, tl.float32)
        for split in range(NUM_SPLITS):
            top = tl.maximum(top, tl.load(max_ptr + split * stride_split + rows, mask=row_ok, other=neg_inf))
        top = tl.where(row_ok, top, 0.0)  # rows past the batch: no -inf - -inf below
        total = tl.zeros((BLOCK_M,), tl.float32)
        weighted = tl.zeros((BLOCK_M,), tl.float32)
        for split in range(NUM_SPLITS):
            part_max = tl.load(max_ptr + split * stride_split + rows, mask=row_ok, other=neg_inf)
            factor = tl.exp(part_max - top)  # an empty split (max -inf) adds nothing
            total += factor * tl.load(sum_ptr + split * stride_split + rows, mask=row_ok, other=0.0)
            weighted += factor * tl.load(weighted_ptr + split * stride_split + rows, mask=row_ok, other=0.0)
        total = tl.where(row_ok, total, 1.0)
        return top, tl.log(total), weighted / total

    @triton.jit
    def _itc_combine_kernel(
        stats_ptr, temp_ptr, saved_ptr, loss_ptr, dtemp_ptr, n_rows, alpha, STATS: tl.constexpr, SAVED: tl.constexpr,
        NUM_SPLITS: tl.constexpr, NUM_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Both directions' splits merged, in one program: per row the two log-sum-exps and 1 / (positives) for
        the backward (``saved`` (2, SAVED, B)); the mean loss and its derivative by the temperature."""
        inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
        loss_total = tl.zeros((BLOCK_M,), tl.float32)
        dtemp_total = tl.zeros((BLOCK_M,), tl.float32)
        stride_split = STATS * n_rows
        for direction in range(2):
            stats = stats_ptr + direction * NUM_SPLITS * stride_split
            for block in range(NUM_BLOCKS):
                rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = rows < n_rows
                top, log_sum, mean_ps = _merge(stats, stats + n_rows, stats + 2 * n_rows, stride_split, rows,
                                               row_ok, NUM_SPLITS, BLOCK_M)
                top_m, log_sum_m, mean_ws = _merge(stats + 3 * n_rows, stats + 4 * n_rows, stats + 5 * n_rows,
                                                   stride_split, rows, row_ok, NUM_SPLITS, BLOCK_M)
                pos_sum = tl.zeros((BLOCK_M,), tl.float32)
                pos_count = tl.zeros((BLOCK_M,), tl.float32)
                for split in range(NUM_SPLITS):
                    pos_sum += tl.load(stats + split * stride_split + 6 * n_rows + rows, mask=row_ok, other=0.0)
                    pos_count += tl.load(stats + split * stride_split + 7 * n_rows + rows, mask=row_ok, other=0.0)
                inv_count = 1.0 / tl.where(row_ok, pos_count, 1.0)
                target_s = alpha * mean_ws + (1.0 - alpha) * pos_sum * inv_count  # sum_j t_j s_j
                loss_total += tl.where(row_ok, top - target_s + log_sum, 0.0)
                # d loss_i / d temp = sum_j (p_j - t_j) ds_j/dtemp, with ds_j/dtemp = -s_j / temp
                dtemp_total += tl.where(row_ok, -(mean_ps - target_s) * inv_temp, 0.0)
                saved = saved_ptr + direction * SAVED * n_rows + rows
                tl.store(saved, top, mask=row_ok)
                tl.store(saved + n_rows, log_sum, mask=row_ok)
                tl.store(saved + 2 * n_rows, top_m, mask=row_ok)
                tl.store(saved + 3 * n_rows, log_sum_m, mask=row_ok)
                tl.store(saved + 4 * n_rows, inv_count, mask=row_ok)
        tl.store(loss_ptr, tl.sum(loss_total, axis=0) / (2 * n_rows))
        tl.store(dtemp_ptr, tl.sum(dtemp_total, axis=0) / (2 * n_rows))

    @triton.jit
    def _itc_backward_kernel(
        q_ptr, q_m_ptr, keys_ptr, queue_ptr, temp_ptr, row_ids_ptr, key_ids_ptr, queue_ids_ptr,
        saved_ptr, partial_ptr,
        n_rows, n_keys, n_queue, dim, offset, alpha,
        stride_q, stride_q_m, stride_keys, stride_queue_d, stride_queue_n,
        HAS_IDS: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (row block, column split): ``sum_j (softmax(s)_j - t_j) k_j`` over its columns, over ``2 B temp``,
        into ``partial[split]`` (B, D) fp32."""
        split = tl.program_id(1)
        rows, row_ok, d, d_ok, q, q_m, inv_temp = _query_block(q_ptr, q_m_ptr, temp_ptr, stride_q, stride_q_m,
                                                               n_rows, dim, BLOCK_M, BLOCK_D)
        top = tl.load(saved_ptr + rows, mask=row_ok, other=0.0)
        log_sum = tl.load(saved_ptr + n_rows + rows, mask=row_ok, other=0.0)
        top_m = tl.load(saved_ptr + 2 * n_rows + rows, mask=row_ok, other=0.0)
        log_sum_m = tl.load(saved_ptr + 3 * n_rows + rows, mask=row_ok, other=0.0)
        inv_count = tl.load(saved_ptr + 4 * n_rows + rows, mask=row_ok, other=0.0)
        scale = inv_temp / (2 * n_rows)

        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        first = split * TILES_PER_SPLIT * BLOCK_N
        for tile in range(TILES_PER_SPLIT):
            cols = first + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            valid, k, s, s_m = _logits(q, q_m, inv_temp, keys_ptr, queue_ptr, stride_keys, stride_queue_d,
                                       stride_queue_n, cols, d, d_ok, n_keys, n_queue, PRECISION)
            positive = _positives(rows, cols, row_ids_ptr, key_ids_ptr, queue_ids_ptr, row_ok, n_keys, n_queue,
                                  offset, HAS_IDS)
            soft_target = tl.exp((s_m - top_m[:, None]) - log_sum_m[:, None])
            target = alpha * soft_target + (1.0 - alpha) * positive.to(tl.float32) * inv_count[:, None]
            # keys past the end are zero columns of k, but exp(0 - max) overflows where every real logit is far
            # below 0 (temp 0.001), and inf x 0 is NaN
            ds = tl.where(valid, tl.exp((s - top[:, None]) - log_sum[:, None]) - target, 0.0) * scale
            acc += tl.dot(ds.to(q.dtype), tl.trans(k), input_precision=PRECISION)
        tl.store(partial_ptr + split * n_rows * dim + rows[:, None] * dim + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])


@dataclass(frozen=True)
class _Grid:
    block_m: int
    block_n: int
    block_d: int
    row_blocks: int
    splits: int
    tiles_per_split: int


def _grid(batch: int, columns: int, dim: int, device: torch.device, tiling: Tiling, splits: int | None) -> _Grid:
    block_m = min(tiling.block_m, max(16, triton.next_power_of_2(batch)))
    row_blocks = triton.cdiv(batch, block_m)
    tiles = triton.cdiv(columns, tiling.block_n)
    if splits is None:
        splits = triton.cdiv(tiling.programs_per_sm * sm_count(device), row_blocks)
    tiles_per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    return _Grid(block_m, tiling.block_n, max(16, triton.next_power_of_2(dim)), row_blocks,
                 triton.cdiv(tiles, tiles_per_split), tiles_per_split)


def _ids(ids: torch.Tensor | None, unused: torch.Tensor) -> torch.Tensor:
    """``ids`` as the kernels read them, or without ids the one placeholder of the call (never read)."""
    return unused if ids is None else ids.contiguous()


def itc_forward(directions, temp, alpha: float, offset: int = 0, tiling: Tiling | None = None,
                splits: int | None = None):
    """The ITC loss of two directions, each ``(q, q_m, keys, queue, row_ids, key_ids, queue_ids)``.

    Returns ``(loss, sims, saved, dloss_dtemp)``: the 0-d fp32 mean loss, a list of each direction's in-batch
    similarities (B, B_k) fp32, what :func:`itc_gradients` needs (2, SAVED, B) fp32, and the 0-d derivative of the
    loss by ``temp``.
    Nothing leaves the device.
    """
    if not HAS_TRITON:
        raise RuntimeError("itc_loss: triton is not installed")
    for direction in directions:
        check_inputs(*direction[:4], temp, *direction[4:], offset)
    q0, _, keys0, queue0 = directions[0][:4]
    batch, dim = q0.shape
    if any(dir_[0].shape != q0.shape or dir_[2].shape != keys0.shape or dir_[3].shape != queue0.shape
           for dir_ in directions):
        raise ValueError("itc_loss: both directions must have the same shapes")
    tiling = tiling or DEFAULT_TILINGS[q0.dtype]  # read at each call: the benchmark sweeps it
    grid = _grid(batch, keys0.shape[0] + queue0.shape[1], dim, q0.device, tiling, splits)
    stats = torch.empty(2, grid.splits, STATS, batch, dtype=torch.float32, device=q0.device)
    # two tensors, not one (2, B, B_k): the custom op returns both, and its outputs may not alias
    sims = [torch.empty(batch, keys0.shape[0], dtype=torch.float32, device=q0.device) for _ in directions]
    temp = temp.reshape(1)
    unused = q0.new_empty(1, dtype=torch.long)  # the id pointers' placeholder where positives are the diagonal
    with device_scope(q0):
        for index, (q, q_m, keys, queue, row_ids, key_ids, queue_ids) in enumerate(directions):
            q, q_m, keys = q.contiguous(), q_m.contiguous(), keys.contiguous()
            _itc_forward_kernel[(grid.row_blocks, grid.splits)](
                q, q_m, keys, queue, temp, _ids(row_ids, unused), _ids(key_ids, unused), _ids(queue_ids, unused),
                stats[index], sims[index],
                batch, keys.shape[0], queue.shape[1], dim, offset,
                q.stride(0), q_m.stride(0), keys.stride(0), queue.stride(0), queue.stride(1), sims[index].stride(0),
                STATS=STATS, HAS_IDS=row_ids is not None, TILES_PER_SPLIT=grid.tiles_per_split,
                PRECISION=dot_precision(q.dtype), BLOCK_M=grid.block_m, BLOCK_N=grid.block_n, BLOCK_D=grid.block_d,
                num_warps=tiling.num_warps, num_stages=tiling.num_stages,
            )
        saved = torch.empty(2, SAVED, batch, dtype=torch.float32, device=q0.device)
        loss = torch.empty((), dtype=torch.float32, device=q0.device)
        dloss_dtemp = torch.empty((), dtype=torch.float32, device=q0.device)
        _itc_combine_kernel[(1,)](stats, temp, saved, loss, dloss_dtemp, batch, float(alpha), STATS=STATS,
                                  SAVED=SAVED, NUM_SPLITS=grid.splits, NUM_BLOCKS=triton.cdiv(batch, 64), BLOCK_M=64)
    return loss, sims, saved, dloss_dtemp


def itc_gradients(directions, temp, alpha: float, saved: torch.Tensor, offset: int = 0,
                  tiling: Tiling | None = None, splits: int | None = None) -> list[torch.Tensor]:
    """``d loss / d q`` for each direction's queries (same dtype as them), from :func:`itc_forward`'s ``saved``.

    Call it before the queues change: it reads them again."""
    if not HAS_TRITON:
        raise RuntimeError("itc_loss: triton is not installed")
    q0, _, keys0, queue0 = directions[0][:4]
    batch, dim = q0.shape
    tiling = tiling or DEFAULT_TILINGS[q0.dtype]  # read at each call: the benchmark sweeps it
    grid = _grid(batch, keys0.shape[0] + queue0.shape[1], dim, q0.device, tiling, splits)
    partial = torch.empty(2, grid.splits, batch, dim, dtype=torch.float32, device=q0.device)
    temp = temp.reshape(1)
    unused = q0.new_empty(1, dtype=torch.long)  # the id pointers' placeholder where positives are the diagonal
    with device_scope(q0):
        for index, (q, q_m, keys, queue, row_ids, key_ids, queue_ids) in enumerate(directions):
            q, q_m, keys = q.contiguous(), q_m.contiguous(), keys.contiguous()
            _itc_backward_kernel[(grid.row_blocks, grid.splits)](
                q, q_m, keys, queue, temp, _ids(row_ids, unused), _ids(key_ids, unused), _ids(queue_ids, unused),
                saved[index], partial[index],
                batch, keys.shape[0], queue.shape[1], dim, offset, float(alpha),
                q.stride(0), q_m.stride(0), keys.stride(0), queue.stride(0), queue.stride(1),
                HAS_IDS=row_ids is not None, TILES_PER_SPLIT=grid.tiles_per_split, PRECISION=dot_precision(q.dtype),
                BLOCK_M=grid.block_m, BLOCK_N=grid.block_n, BLOCK_D=grid.block_d,
                num_warps=tiling.num_warps, num_stages=tiling.num_stages,
            )
    # splits summed in a fixed order; one tensor per direction (the custom op's outputs may not alias)
    return [partial[index].sum(dim=0).to(direction[0].dtype) for index, direction in enumerate(directions)]


def itc_flops(batch: int, columns: int, dim: int, with_gradients: bool) -> int:
    """Matrix-product FLOPs of both directions: per direction two (B, D) x (D, N) products for the loss; for the
    gradients the same two again and (B, N) x (N, D)."""
    return 2 * (5 if with_gradients else 2) * 2 * batch * columns * dim
