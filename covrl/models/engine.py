"""Policy engine: forward-only log-prob passes and training steps on megatron-core.

The engine owns a (possibly virtual-pipeline-chunked) ``GPTModel`` and runs batches
through megatron-core's pipeline schedules: no pipelining at PP=1, 1F1B at PP>1, and
the interleaved schedule when the model has several virtual chunks. Training wraps
the chunks in Megatron DDP over the data-parallel group and steps Megatron's
optimizer (Adam, global-norm gradient clipping, lr/weight-decay schedule).

Batch layout (this rank's data-parallel shard):
    ``input_ids [batch, seq]`` right-padded token ids, ``attention_mask [batch, seq]``
    with 1 on real tokens. Any other entry with a leading ``batch`` dimension travels
    with its micro-batch to the loss function.

Per-token outputs are aligned with the token they score: ``logp[b, t] =
log pi(input_ids[b, t] | input_ids[b, :t])`` and ``entropy[b, t]`` is the entropy of
that same next-token distribution; position 0 (no prefix) is 0. Under TP every rank
holds the same per-token values (computed from ``[tokens, vocab/tp]`` logits with TP
all-reduces, never gathering the vocabulary); under PP they are broadcast from the last
stage, so every rank returns them.

Padding: batches are right-padded and attention is causal, so a real token never
attends to padding and the pad positions only need masking in the loss; no
``[b, 1, s, s]`` mask is materialised. Packed (THD) sequences would go through the
same forward step with ``PackedSeqParams`` (cu_seqlens per micro-batch) and a
``[1, total_tokens]`` token layout; the per-token outputs would be unpacked with the
same cu_seqlens before the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from covrl.algorithms.aggregation import megatron_loss_scale
from covrl.models.config import EngineConfig, OptimizerConfig
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
    """Runs forward-only and training passes of a megatron-core policy.

    Args:
        model: the model chunks of this rank (one per virtual pipeline stage), built
            with the parallel state of :func:`covrl.parallel.initialize`.
        vocab_size: the true vocabulary size; columns beyond it (TP padding) never
            enter the softmax.
        optimizer: optimizer settings; None builds a forward-only engine.
        config: micro-batching, temperature and log-prob settings.
    """

    def __init__(
        self,
        model: list[torch.nn.Module],
        vocab_size: int,
        optimizer: OptimizerConfig | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.module import Float16Module

        self.config = config or EngineConfig()
        self.vocab_size = vocab_size
        self.model = list(model)
        # Batches are moved here, and every tensor a collective sees is made here: the
        # NCCL groups of a GPU run reject host tensors.
        self.device = get_device()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.dp_size = ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.last_stage_rank = ps.get_pipeline_model_parallel_last_rank()
        self.model_config = self.model[0].config
        if self.model_config.fp16:
            raise ValueError("fp16 parameters are not supported (no loss scaling): use bf16")
        if self.model_config.bf16 and not isinstance(self.model[0], Float16Module):
            # As Megatron-LM's get_model: casts the fp32-created norms to bf16 and the
            # first stage's inputs / last stage's outputs across the boundary.
            self.model = [Float16Module(self.model_config, m) for m in self.model]
        if len(self.model) > 1 and self.pp_size == 2:
            # With two stages the previous and the next peer are the same rank, and the
            # interleaved schedule's batched send/recv pairs them up wrongly.
            self.model_config.batch_p2p_comm = False
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

        cfg = self.model_config
        bf16 = cfg.params_dtype == torch.bfloat16
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
        self.model = [
            DistributedDataParallel(cfg, ddp_config, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(self.model)
        ]
        cfg.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        cfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=settings.lr,
                min_lr=settings.min_lr if settings.min_lr is not None else settings.lr,
                weight_decay=settings.weight_decay,
                adam_beta1=settings.adam_beta1,
                adam_beta2=settings.adam_beta2,
                adam_eps=settings.adam_eps,
                clip_grad=settings.clip_grad,
                bf16=bf16,
                params_dtype=cfg.params_dtype,
            ),
            self.model,
            use_gloo_process_groups=False,
        )
        min_lr = settings.min_lr if settings.min_lr is not None else settings.lr
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

    # ------------------------------------------------------------------ passes
    @torch.no_grad()
    def forward_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> TokenOutputs:
        """Log-probs and entropies of the policy on a batch, without gradients.

        Args:
            input_ids: ``[batch, seq]`` right-padded token ids.
            attention_mask: ``[batch, seq]``, 1 on real tokens.
        Returns:
            :class:`TokenOutputs` with ``[batch, seq]`` tensors on every rank.
        """
        batch = self._to_device({"input_ids": input_ids, "attention_mask": attention_mask})
        collected: list[TokenOutputs] = []

        def collect(out: TokenOutputs, micro):
            collected.append(TokenOutputs(out.logp.detach(), out.entropy.detach()))
            return out.logp.new_zeros(()), {}

        for m in self.model:
            m.eval()
        self._run(batch, collect, forward_only=True)
        b, s = input_ids.shape
        flat = torch.empty(2, b, s, dtype=torch.float32, device=self.device)
        if self.is_last_stage:
            flat[0] = torch.cat([c.logp for c in collected], dim=0)
            flat[1] = torch.cat([c.entropy for c in collected], dim=0)
        if self.pp_size > 1:
            dist.broadcast(flat, src=self.last_stage_rank, group=self.pp_group)
        return TokenOutputs(flat[0], flat[1])

    def train_step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> StepResult:
        """One optimizer step over this rank's shard of a mini-batch.

        ``loss_fn(outputs, micro_batch) -> (loss, metrics)`` is called once per
        micro-batch on the last pipeline stage. The gradient of the step is that of
        the *sum* of its returned losses over all micro-batches and all data-parallel
        ranks, so the loss function normalises by global counts (e.g. token-mean:
        divide by the mini-batch's total valid-token count over every DP rank).
        Metrics (scalar tensors) are summed the same way.
        """
        if self.optimizer is None:
            raise RuntimeError("train_step needs an engine built with optimizer settings")
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(self._to_device(batch), loss_fn, forward_only=False)
        update_successful, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = self._reduce_metrics(losses)
        return StepResult(
            loss=metrics.pop("loss"),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"],
            update_successful=bool(update_successful),
            metrics=metrics,
        )

    # ------------------------------------------------------------------ internals
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _split(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        if input_ids.dim() != 2 or mask.shape != input_ids.shape:
            raise ValueError(
                f"batch['input_ids'] must be [batch, seq] and batch['attention_mask'] the same "
                f"shape; got {tuple(input_ids.shape)} and {tuple(mask.shape)}"
            )
        # Right padding: once a row's mask drops to 0 it stays 0.
        if (mask[:, 1:] > mask[:, :-1]).any():
            raise ValueError("batch['attention_mask'] must be right-padded (1s then 0s per row)")
        b, mbs = input_ids.shape[0], self.config.micro_batch_size
        if b % mbs:
            raise ValueError(
                f"batch size {b} is not divisible by EngineConfig.micro_batch_size={mbs}"
            )
        n = b // mbs
        if len(self.model) > 1 and n % self.pp_size:
            raise ValueError(
                f"the interleaved pipeline schedule needs the number of micro-batches ({n}) "
                f"to be a multiple of pipeline_model_parallel_size={self.pp_size}"
            )
        for key, value in batch.items():
            if value.shape[0] != b:
                raise ValueError(f"batch[{key!r}] has leading dim {value.shape[0]}, expected {b}")
        return [{k: v[i * mbs : (i + 1) * mbs] for k, v in batch.items()} for i in range(n)]

    def _token_outputs(self, logits: torch.Tensor, input_ids: torch.Tensor) -> TokenOutputs:
        """``logits [mb, seq, vocab/tp]`` -> per-token outputs aligned with input_ids."""
        mb, s, v_local = logits.shape
        # The logits at position t score token t+1; the last position scores nothing
        # (a dummy target 0, dropped below), which keeps the logits a free view.
        target = torch.zeros_like(input_ids)
        target[:, :-1] = input_ids[:, 1:]
        logp, ent = vocab_parallel_logprob_entropy(
            logits.reshape(mb * s, v_local),
            target.reshape(-1),
            tp_group=self.tp_group,
            vocab_size=self.vocab_size,
            temperature=self.config.temperature,
            chunk_size=self.config.logprob_chunk_size,
            entropy_requires_grad=self.config.entropy_requires_grad,
        )
        logp, ent = logp.view(mb, s), ent.view(mb, s)
        zero = logp.new_zeros(mb, 1)
        return TokenOutputs(torch.cat([zero, logp[:, :-1]], 1), torch.cat([zero, ent[:, :-1]], 1))

    def _run(self, batch, loss_fn: LossFn, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micro = self._split(batch)
        seq = batch["input_ids"].shape[1]
        scale = megatron_loss_scale(len(micro), self.dp_size)
        position_ids = torch.arange(seq, device=batch["input_ids"].device)

        def forward_step(data_iterator, model):
            data = next(data_iterator)
            ids = data["input_ids"]
            pos = position_ids.unsqueeze(0).expand(ids.shape[0], -1)
            output = model(ids, pos, attention_mask=None)

            def loss_func(logits):
                loss, metrics = loss_fn(self._token_outputs(logits, ids), data)
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

        iterators = [iter(micro) for _ in self.model] if len(self.model) > 1 else iter(micro)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro),
            seq_length=seq,
            micro_batch_size=self.config.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce_metrics(self, per_micro: list[dict]) -> dict[str, float]:
        """Sum metric dicts over micro-batches (last stage), then over DP, then share
        them with every pipeline stage."""
        from megatron.core import parallel_state as ps

        keys = sorted(per_micro[0]) if per_micro else []
        n = torch.tensor([len(keys)], dtype=torch.long, device=self.device)
        if self.pp_size > 1:
            dist.broadcast(n, src=self.last_stage_rank, group=self.pp_group)
        values = torch.zeros(int(n.item()), dtype=torch.float64, device=self.device)
        if self.is_last_stage:
            for m in per_micro:
                values += torch.stack([m[k].double().reshape(()) for k in keys])
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        if self.pp_size > 1:
            names = [keys]
            dist.broadcast_object_list(names, src=self.last_stage_rank, group=self.pp_group)
            keys = names[0]
            dist.broadcast(values, src=self.last_stage_rank, group=self.pp_group)
        return dict(zip(keys, values.tolist(), strict=True))
