"""Policy engine: forward-only log-prob passes, training steps, checkpoints and exports
of a megatron-core policy.

The engine owns a (possibly virtual-pipeline-chunked) ``GPTModel`` and runs batches
through megatron-core's pipeline schedules: no pipelining at PP=1, 1F1B at PP>1, and
the interleaved schedule when the model has several virtual chunks. Training wraps
the chunks in Megatron DDP over the data-parallel group and steps Megatron's
optimizer (Adam, global-norm gradient clipping, lr/weight-decay schedule).

Batch layout (this rank's data-parallel shard):
    ``input_ids [batch, seq]`` right-padded token ids, ``attention_mask [batch, seq]``
    with 1 on real tokens, and the rows' lengths (host ints; derived from the mask when
    not given, at the cost of one device-to-host copy). Any other entry with a leading
    ``batch`` dimension travels with its micro-batch to the loss function, trimmed like
    the micro-batch to its longest row.

Micro-batches (:meth:`PolicyEngine.micro_batches`, :mod:`covrl.engine.packing`): a
fixed number of rows, sorted by length and each trimmed to its longest row, or a token
budget (``EngineConfig.max_tokens_per_micro_batch``) with the rows of a micro-batch
packed end to end (``[1, tokens]``, megatron's THD ``PackedSeqParams``) and no padding
at all. Callers that work per micro-batch (the selection's per-micro-batch scope) use
the same plan, so nothing is split twice.

Per-token outputs are aligned with the token they score: ``logp[b, t] =
log pi(input_ids[b, t] | input_ids[b, :t])`` and ``entropy[b, t]`` is the entropy of
that same next-token distribution; position 0 (no prefix) is 0. Under TP every rank
holds the same per-token values (computed from ``[tokens, vocab/tp]`` logits with TP
all-reduces, never gathering the vocabulary); under PP they are broadcast from the last
stage, so every rank returns them.

Padding: batches are right-padded and attention is causal, so a real token never
attends to padding and the pad positions only need masking in the loss; no
``[b, 1, s, s]`` mask is materialised on the padded path. Packed outputs are unpacked
to the micro-batch's ``[rows, seq]`` before the loss.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from covrl import checkpointing
from covrl.algorithms.aggregation import megatron_loss_scale
from covrl.engine.config import EngineConfig, OptimizerConfig
from covrl.engine.packing import MicroBatch, PackedSequences, plan_micro_batches
from covrl.models import PolicyModelConfig, export_hf_weights, save_hf_checkpoint
from covrl.models.hf_weights import ExportStats
from covrl.ops import vocab_parallel_logprob_entropy
from covrl.parallel import get_device

LossFn = Callable[["TokenOutputs", dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]


@dataclass
class TokenOutputs:
    """Per-token outputs of one micro-batch, ``[micro_batch, seq]`` float32."""

    logp: torch.Tensor
    entropy: torch.Tensor


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    update_successful: bool
    # Loss-function metrics summed over micro-batches and data-parallel ranks.
    metrics: dict[str, float] = field(default_factory=dict)


class PolicyEngine:
    """Runs forward-only and training passes of a megatron-core policy, and owns its
    state: parameters, optimizer, schedule, checkpoints and exports.

    Args:
        model: the model chunks of this rank (one per virtual pipeline stage), built
            with the parallel state of :func:`covrl.parallel.initialize`.
        model_config: the policy's architecture (its ``vocab_size`` is the true
            vocabulary: columns beyond it, TP padding, never enter the softmax).
        optimizer: optimizer settings; None builds a forward-only engine.
        config: micro-batching, temperature and log-prob settings.

    ``weights_version`` counts the changes of the parameters (successful optimizer
    steps and checkpoint loads), so a consumer of the weights (the rollout engine) can
    tell whether its copy is current.
    """

    def __init__(
        self,
        model: list[torch.nn.Module],
        model_config: PolicyModelConfig,
        optimizer: OptimizerConfig | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.module import Float16Module

        self.config = config or EngineConfig()
        self.model_config = model_config
        self.vocab_size = model_config.vocab_size
        self.model = list(model)
        # Batches are moved here, and every tensor a collective sees is made here: the
        # NCCL groups of a GPU run reject host tensors.
        self.device = get_device()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.last_stage_rank = ps.get_pipeline_model_parallel_last_rank()
        self.weights_version = 0
        # megatron's TransformerConfig of the chunks (schedules read it).
        self.transformer_config = self.model[0].config
        if self.transformer_config.fp16:
            raise ValueError("fp16 parameters are not supported (no loss scaling): use bf16")
        if self.transformer_config.bf16 and not isinstance(self.model[0], Float16Module):
            # As Megatron-LM's get_model: casts the fp32-created norms to bf16 and the
            # first stage's inputs / last stage's outputs across the boundary.
            self.model = [Float16Module(self.transformer_config, m) for m in self.model]
        if len(self.model) > 1 and self.pp_size == 2:
            # With two stages the previous and the next peer are the same rank, and the
            # interleaved schedule's batched send/recv pairs them up wrongly.
            self.transformer_config.batch_p2p_comm = False
        # Micro-batches are trimmed or packed to their own length, and the pipeline
        # stages exchange each activation's shape before it. The interleaved schedule
        # does not exchange shapes correctly: its micro-batches keep one shape.
        self.uniform_shapes = len(self.model) > 1
        self.transformer_config.variable_seq_lengths = self.pp_size > 1 and not self.uniform_shapes
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.optimizer = self.scheduler = None
        if optimizer is not None:
            self._setup_training(optimizer)

    # ------------------------------------------------------------------ set-up
    def _setup_training(self, settings: OptimizerConfig) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.transformer_config
        bf16 = cfg.params_dtype == torch.bfloat16
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=settings.use_distributed_optimizer,
        )
        self.model = [
            DistributedDataParallel(cfg, ddp_config, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(self.model)
        ]
        cfg.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        cfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        min_lr = settings.lr if settings.min_lr is None else settings.min_lr
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=settings.lr,
                min_lr=min_lr,
                weight_decay=settings.weight_decay,
                adam_beta1=settings.adam_beta1,
                adam_beta2=settings.adam_beta2,
                adam_eps=settings.adam_eps,
                clip_grad=settings.clip_grad,
                use_distributed_optimizer=settings.use_distributed_optimizer,
                bf16=bf16,
                params_dtype=cfg.params_dtype,
            ),
            self.model,
            use_gloo_process_groups=False,
        )
        # Megatron sets each group's lr and weight decay (wd_mult=0 for norms and
        # biases) from the scheduler, also at construction.
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if settings.lr_warmup_steps else settings.lr,
            max_lr=settings.lr,
            min_lr=min_lr,
            lr_warmup_steps=settings.lr_warmup_steps,
            lr_decay_steps=max(settings.lr_decay_steps, settings.lr_warmup_steps + 1),
            lr_decay_style=settings.lr_decay_style,
            start_wd=settings.weight_decay,
            end_wd=settings.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken (the learning-rate schedule's position), also across a
        checkpoint load; 0 for a forward-only engine."""
        return self.scheduler.num_steps if self.scheduler is not None else 0

    # ------------------------------------------------------------------ micro-batches
    def micro_batches(self, lengths: Sequence[int]) -> list[MicroBatch]:
        """The micro-batches this engine runs a batch with rows of ``lengths`` tokens in
        (see the module docstring). Deterministic, so every rank of a model-parallel
        group plans the same."""
        return plan_micro_batches(
            lengths,
            micro_batch_size=self.config.micro_batch_size,
            max_tokens=self.config.max_tokens_per_micro_batch,
            multiple_of=self.pp_size if len(self.model) > 1 else 1,
        )

    @staticmethod
    def row_lengths(attention_mask: torch.Tensor) -> list[int]:
        """The rows' lengths from a right-padded mask (one device-to-host copy)."""
        return attention_mask.sum(dim=1).tolist()

    # ------------------------------------------------------------------ passes
    @torch.no_grad()
    def forward_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        micro_batches: Sequence[MicroBatch] | None = None,
        *,
        lengths: Sequence[int] | None = None,
    ) -> TokenOutputs:
        """Log-probs and entropies of the policy on a batch, without gradients.

        Args:
            input_ids: ``[batch, seq]`` right-padded token ids.
            attention_mask: ``[batch, seq]``, 1 on real tokens.
            micro_batches: the plan to run (default :meth:`micro_batches` of the rows).
            lengths: the rows' lengths (default: read from ``attention_mask``).
        Returns:
            :class:`TokenOutputs` with ``[batch, seq]`` tensors on every rank, on this
            engine's device (0 at padding).
        """
        batch = self._to_device({"input_ids": input_ids, "attention_mask": attention_mask})
        plan = self._plan(batch, micro_batches, lengths)
        collected: list[TokenOutputs] = []

        def collect(out: TokenOutputs, micro):
            collected.append(TokenOutputs(out.logp.detach(), out.entropy.detach()))
            return out.logp.new_zeros(()), {}

        for m in self.model:
            m.eval()
        self._run(batch, plan, collect, forward_only=True)
        b, s = input_ids.shape
        flat = torch.zeros(2, b, s, dtype=torch.float32, device=self.device)
        if self.is_last_stage:
            for mb, out in zip(plan, collected, strict=True):
                mb.put(flat[0], out.logp)
                mb.put(flat[1], out.entropy)
        if self.pp_size > 1:
            dist.broadcast(flat, src=self.last_stage_rank, group=self.pp_group)
        return TokenOutputs(flat[0], flat[1])

    def train_step(
        self,
        batch: dict[str, torch.Tensor],
        loss_fn: LossFn,
        micro_batches: Sequence[MicroBatch] | None = None,
        *,
        lengths: Sequence[int] | None = None,
    ) -> StepResult:
        """One optimizer step over this rank's shard of a mini-batch.

        ``loss_fn(outputs, micro_batch) -> (loss, metrics)`` is called once per
        micro-batch (``micro_batches``, default :meth:`micro_batches` of the rows'
        ``lengths``) on the last pipeline stage, with the micro-batch's rows of every
        batch entry, trimmed to its longest row (``[rows, seq_len]``). The gradient of the step is that of the *sum* of its returned
        losses over all micro-batches and all data-parallel ranks, so the loss function
        normalises by global counts (e.g. token-mean: divide by the mini-batch's total
        valid-token count over every DP rank). Metrics (scalar tensors) are summed the
        same way.
        """
        if self.optimizer is None:
            raise RuntimeError("train_step needs an engine built with optimizer settings")
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        batch = self._to_device(batch)
        plan = self._plan(batch, micro_batches, lengths)
        losses = self._run(batch, plan, loss_fn, forward_only=False)
        update_successful, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        if update_successful:
            self.weights_version += 1
        metrics = self._reduce_metrics(losses)
        return StepResult(
            loss=metrics.pop("loss"),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"],
            update_successful=bool(update_successful),
            metrics=metrics,
        )

    # ------------------------------------------------------------------ state
    def hf_weights(
        self, dtype: torch.dtype | None = None, stats: ExportStats | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights as full Hugging Face tensors
        (:func:`covrl.models.export_hf_weights`; collective over the model-parallel
        group, which must consume the whole stream; ``stats`` counts the bytes moved)."""
        return export_hf_weights(self.model, self.model_config, dtype=dtype, stats=stats)

    def save_checkpoint(
        self,
        root: str | os.PathLike,
        iteration: int,
        *,
        hf_source: str | os.PathLike | None = None,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Save parameters, optimizer, schedule and RNG states atomically as
        ``<root>/iter_NNNNNNN`` (:func:`covrl.checkpointing.save_checkpoint`;
        collective). ``extra``: the caller's JSON run state, returned on load."""
        return checkpointing.save_checkpoint(
            root,
            iteration,
            self.model,
            self.model_config,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            hf_source=hf_source,
            extra=extra,
            overwrite=overwrite,
        )

    def load_checkpoint(
        self, path: str | os.PathLike, *, load_optimizer: bool = True
    ) -> checkpointing.CheckpointMetadata:
        """Restore what :meth:`save_checkpoint` saved, at this engine's parallel layout
        (:func:`covrl.checkpointing.load_checkpoint`; collective). Returns the
        checkpoint's metadata (``extra`` holds the caller's state)."""
        metadata = checkpointing.load_checkpoint(
            path,
            self.model,
            self.model_config,
            optimizer=self.optimizer if load_optimizer else None,
            scheduler=self.scheduler if load_optimizer else None,
        )
        self.weights_version += 1
        return metadata

    def export_hf(
        self, path: str | os.PathLike, *, copy_files_from: str | os.PathLike | None = None
    ) -> Path:
        """Write the policy as a Hugging Face checkpoint directory
        (:func:`covrl.models.save_hf_checkpoint`: atomic, rank 0 writes; collective),
        replacing an earlier export at ``path``."""
        return save_hf_checkpoint(
            self.model, self.model_config, path, copy_files_from=copy_files_from, overwrite=True
        )

    # ------------------------------------------------------------------ internals
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _plan(
        self,
        batch: dict[str, torch.Tensor],
        micro_batches: Sequence[MicroBatch] | None,
        lengths: Sequence[int] | None,
    ) -> list[MicroBatch]:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        if input_ids.dim() != 2 or mask.shape != input_ids.shape:
            raise ValueError(
                f"batch['input_ids'] must be [batch, seq] and batch['attention_mask'] the same "
                f"shape; got {tuple(input_ids.shape)} and {tuple(mask.shape)}"
            )
        b = input_ids.shape[0]
        for key, value in batch.items():
            if value.shape[0] != b:
                raise ValueError(f"batch[{key!r}] has leading dim {value.shape[0]}, expected {b}")
        if micro_batches is not None:
            return list(micro_batches)
        if lengths is None:
            # Right padding: once a row's mask drops to 0 it stays 0.
            if (mask[:, 1:] > mask[:, :-1]).any():
                raise ValueError(
                    "batch['attention_mask'] must be right-padded (1s then 0s per row)"
                )
            lengths = self.row_lengths(mask)
        if len(lengths) != b:
            raise ValueError(f"{len(lengths)} lengths for a batch of {b} rows")
        return self.micro_batches(lengths)

    def _vocab_outputs(self, logits: torch.Tensor, target: torch.Tensor):
        """``logits [tokens, vocab/tp]``, ``target [tokens]`` -> log-prob and entropy
        ``[tokens]`` of the true vocabulary (TP all-reduces, no vocabulary gather)."""
        return vocab_parallel_logprob_entropy(
            logits,
            target,
            tp_group=self.tp_group,
            vocab_size=self.vocab_size,
            temperature=self.config.temperature,
            chunk_size=self.config.logprob_chunk_size,
            entropy_requires_grad=self.config.entropy_requires_grad,
        )

    def _token_outputs(self, logits: torch.Tensor, input_ids: torch.Tensor) -> TokenOutputs:
        """``logits [mb, seq, vocab/tp]`` -> per-token outputs aligned with input_ids."""
        mb, s, v_local = logits.shape
        # The logits at position t score token t+1; the last position scores nothing
        # (a dummy target 0, dropped below), which keeps the logits a free view.
        target = torch.zeros_like(input_ids)
        target[:, :-1] = input_ids[:, 1:]
        logp, ent = self._vocab_outputs(logits.reshape(mb * s, v_local), target.reshape(-1))
        logp, ent = logp.view(mb, s), ent.view(mb, s)
        zero = logp.new_zeros(mb, 1)
        return TokenOutputs(torch.cat([zero, logp[:, :-1]], 1), torch.cat([zero, ent[:, :-1]], 1))

    def _packed_outputs(
        self, logits: torch.Tensor, packed: PackedSequences, seq_len: int
    ) -> TokenOutputs:
        """``logits [1, total, vocab/tp]`` of a pack -> ``[rows, seq_len]`` outputs."""
        logp, ent = self._vocab_outputs(logits.reshape(packed.total, -1), packed.next_tokens())
        return TokenOutputs(packed.unpack(logp, seq_len), packed.unpack(ent, seq_len))

    def _run(
        self, batch, plan: list[MicroBatch], loss_fn: LossFn, forward_only: bool
    ) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        packing = self.config.max_tokens_per_micro_batch is not None
        # Sequence parallelism splits the tokens (packed or per row) over TP ranks.
        multiple = self.tp_size if self.transformer_config.sequence_parallel else 1
        if not packing and multiple > 1:
            batch = _pad_columns(batch, multiple)
        # One shape for all micro-batches where the schedule needs it: the longest.
        width = max(mb.seq_len for mb in plan) if self.uniform_shapes else None
        min_total = max(mb.num_tokens for mb in plan) if self.uniform_shapes else 0
        micro = [
            {k: mb.take(v, _round_up(width or mb.seq_len, multiple)) for k, v in batch.items()}
            for mb in plan
        ]
        scale = megatron_loss_scale(len(micro), self.dp_size)

        def forward_step(data_iterator, model):
            mb, data = next(data_iterator)
            ids = data["input_ids"]
            if packing:
                packed = PackedSequences.pack(ids, mb.lengths, multiple, min_total)
                output = model(
                    packed.input_ids,
                    packed.position_ids,
                    attention_mask=None,
                    packed_seq_params=packed.params(),
                )
            else:
                pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
                output = model(ids, pos, attention_mask=None)

            def loss_func(logits):
                if packing:
                    outputs = self._packed_outputs(logits, packed, ids.shape[1])
                else:
                    outputs = self._token_outputs(logits, ids)
                loss, metrics = loss_fn(outputs, data)
                reported = {"loss": loss.detach().clone()}
                reported.update(
                    {
                        k: torch.as_tensor(v, device=self.device).detach().float()
                        for k, v in metrics.items()
                    }
                )
                # Undo the schedule's division by the number of micro-batches and
                # DDP's average over DP: the gradient is that of the summed loss.
                return loss * scale, reported

            return output, loss_func

        pairs = list(zip(plan, micro, strict=True))
        iterators = [iter(pairs) for _ in self.model] if len(self.model) > 1 else iter(pairs)
        # Under variable_seq_lengths megatron reads each activation's shape; otherwise
        # every micro-batch has these (uniform shapes, or no pipeline at all).
        first = plan[0]
        if packing:
            seq = _round_up(max(first.num_tokens, min_total), multiple)
        else:
            seq = _round_up(width or first.seq_len, multiple)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro),
            seq_length=seq,
            micro_batch_size=1 if packing else len(first.rows),
            forward_only=forward_only,
        )

    def _reduce_metrics(self, per_micro: list[dict]) -> dict[str, float]:
        """Sum metric dicts over micro-batches (last stage), then over DP, then share
        them with every pipeline stage."""
        keys = sorted(per_micro[0]) if per_micro else []
        n = torch.tensor([len(keys)], dtype=torch.long, device=self.device)
        if self.pp_size > 1:
            dist.broadcast(n, src=self.last_stage_rank, group=self.pp_group)
        values = torch.zeros(int(n.item()), dtype=torch.float64, device=self.device)
        if self.is_last_stage:
            for m in per_micro:
                values += torch.stack([m[k].double().reshape(()) for k in keys])
        dist.all_reduce(values, group=self.dp_group)
        if self.pp_size > 1:
            names = [keys]
            dist.broadcast_object_list(names, src=self.last_stage_rank, group=self.pp_group)
            keys = names[0]
            dist.broadcast(values, src=self.last_stage_rank, group=self.pp_group)
        return dict(zip(keys, values.tolist(), strict=True))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_columns(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Right-pad every ``[batch, seq, ...]`` entry to a multiple of ``multiple`` columns
    (sequence parallelism splits each row's positions over the TP ranks)."""
    s = batch["input_ids"].shape[1]
    extra = _round_up(s, multiple) - s
    if not extra:
        return batch
    out = {}
    for k, v in batch.items():
        if v.dim() >= 2 and v.shape[1] == s:
            v = torch.cat([v, v.new_zeros(v.shape[0], extra, *v.shape[2:])], dim=1)
        out[k] = v
    return out
