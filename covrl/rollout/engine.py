"""vLLM colocated with megatron-core training: one engine per rank, SPMD.

Every rank of the torchrun world builds a ``vllm.LLM`` with the
``external_launcher`` executor: vLLM runs in-process (no engine-core process, no
Ray), joins the existing ``torch.distributed`` world and builds its own groups on it.
With world ``W`` and rollout TP ``r``, vLLM lays the ranks out as ``W / r`` external
data-parallel replicas of ``r`` consecutive ranks each; the training layout (TP x PP
x DP of megatron-core) is unrelated. Because scheduling is deterministic, the ``r``
ranks of a replica run the same requests in lock-step.

Per iteration::

    gens = engine.generate(prompts, sampling, seed=step)   # same Generations everywhere
    ... rewards, old log-probs ...
    engine.sleep()                                          # CUDA: free KV cache + weights
    ... ppo_update ...
    engine.sync_weights(model_chunks, model_config)         # wakes, reloads, resets caches

Log-probs: vLLM runs with ``logprobs_mode="processed_logprobs"``, so a sampled token's
log-prob is taken from the distribution it was sampled from: logits / temperature,
then top-k / top-p. Without truncation that is exactly the trainer's
``log_softmax(logits / T)`` (see docs/rollout.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from covrl.models import PolicyModelConfig, export_hf_weights
from covrl.models.hf_config import parse_dtype
from covrl.models.hf_weights import ExportStats
from covrl.parallel import get_device, raise_if_any_rank
from covrl.rollout.config import RolloutConfig, SamplingConfig
from covrl.rollout.generations import (
    FINISH_REASONS,
    Generations,
    gather_replica_rows,
    make_generations,
    split_evenly,
)
from covrl.rollout.memory import peak_extra_memory
from covrl.rollout.weight_sync import BucketedWeightStream, shape_errors


@contextlib.contextmanager
def preserved_rng_state():
    """Restore python / numpy / torch (CPU and CUDA) RNG states on exit: vLLM seeds the
    global generators when its worker starts, which must not move training's."""
    import numpy as np

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _job_unique_cpu_shm_names() -> None:
    """Name vLLM's CPU shared-memory segments after this job's rendezvous.

    vLLM's CPU TP communicator names its segments after the init method, which is
    ``env://`` under ``external_launcher``: the same for every job on the host, so two
    jobs (or a job and the segments a killed one left behind) collide with "create shm
    in SHMManager failed. errno: 17". ``MASTER_ADDR:MASTER_PORT`` is the same on every
    rank of a job and differs between concurrent jobs.
    """
    from vllm.distributed.device_communicators import cpu_communicator

    shm = cpu_communicator._CPUSHMDistributed
    original = shm.make_group_name
    if getattr(original, "job_unique", False):
        return

    def make_group_name(communicator) -> str:
        return f"{original(communicator)}-{_job_id()}"

    make_group_name.job_unique = True
    shm.make_group_name = staticmethod(make_group_name)


def _job_id() -> str:
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def _unlink_cpu_shm_names(group: dist.ProcessGroup | None) -> None:
    """Unlink this job's shared-memory segment names once every rank has mapped them
    (collective): the memory lives until the last process unmaps it, and no name is
    left in /dev/shm when a job ends, however it ends."""
    dist.barrier(group=group)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    suffix = f"-cpushm-{_job_id()}_"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/dev/shm"):
            if suffix in entry.name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _reprocess_shared_weight_layers(worker) -> int:
    """Runs on a vLLM worker after an in-place reload: re-run weight post-processing
    of every layer whose weight is shared with another layer (tied embeddings).

    vLLM's checkpoint loader skips ``lm_head.weight`` of a tied model, so the reload
    never touches the LM head; its weight is the (updated) embedding tensor, but on
    CPU its GEMM runs on a packed copy made at start-up, which would stay stale.
    Returns the number of layers processed.
    """
    model = worker.model_runner.get_model()
    by_weight: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            by_weight.setdefault(id(weight), []).append(module)
    count = 0
    with torch.no_grad():
        for modules in by_weight.values():
            if len(modules) < 2:
                continue
            for module in modules:
                method = getattr(module, "quant_method", None)
                if method is not None:
                    method.process_weights_after_loading(module)
                    count += 1
    return count


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """The vLLM request seed of sample ``sample`` of prompt ``prompt`` (global indices),
    so a sample does not depend on which replica draws it."""
    digest = hashlib.blake2b(f"{seed}:{prompt}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _vllm_dtype(config: RolloutConfig, model_config: PolicyModelConfig) -> torch.dtype:
    if config.dtype == "auto":
        return model_config.params_dtype
    return parse_dtype(config.dtype, "rollout.dtype")


def check_model(hf_model_dir: str | os.PathLike, config: RolloutConfig) -> str | None:
    """Why vLLM could not serve this checkpoint here, or None: an architecture vLLM
    cannot load, a layout covrl cannot sync, a head dim the CPU attention rejects."""
    from transformers import AutoConfig
    from vllm.model_executor.models import ModelRegistry

    try:
        hf = AutoConfig.from_pretrained(hf_model_dir)
    except Exception as exc:  # noqa: BLE001 - reported with the path
        return f"{hf_model_dir}: cannot read config.json ({type(exc).__name__}: {exc})"
    archs = list(getattr(hf, "architectures", None) or [])
    supported = ModelRegistry.get_supported_archs()
    if not archs or not any(a in supported for a in archs):
        return (
            f"{hf_model_dir}: config field architectures={archs} is not loadable by vLLM "
            "(none of them is in vllm.ModelRegistry)"
        )
    try:
        model = PolicyModelConfig.from_hf(hf)
    except ValueError as exc:
        return f"{hf_model_dir}: {exc}"
    heads = model.num_attention_heads
    vllm_head_dim = model.hidden_size // heads
    if model.model_type == "qwen2" and model.head_dim != vllm_head_dim:
        return (
            f"{hf_model_dir}: config field head_dim={model.head_dim} differs from hidden_size / "
            f"num_attention_heads = {vllm_head_dim}, which vLLM's Qwen2 uses"
        )
    if not torch.cuda.is_available():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if model.head_dim not in sizes:
            return (
                f"{hf_model_dir}: head_dim={model.head_dim} (hidden_size / num_attention_heads) "
                f"is not supported by vLLM's CPU attention; expected one of {sizes}"
            )
    r = config.tensor_parallel_size
    if heads % r:
        return (
            f"rollout.tensor_parallel_size={r} must divide num_attention_heads={heads} of "
            f"{hf_model_dir}"
        )
    return None


class _DropRotaryReloadWarning(logging.Filter):
    """vLLM warns "RotaryEmbedding: Failed to load weights" on every in-place reload:
    the rotary cos/sin cache is computed from the config, never a checkpoint tensor, so
    a sync that leaves it alone is correct and the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def _quiet_vllm(level: str) -> None:
    # vLLM (re)configures its loggers from VLLM_LOGGING_LEVEL when an engine starts, so
    # the variable is what sticks; the logger level covers lines logged before that.
    os.environ["VLLM_LOGGING_LEVEL"] = level.upper()
    logging.getLogger("vllm").setLevel(level.upper())
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _DropRotaryReloadWarning) for f in reload_logger.filters):
        reload_logger.addFilter(_DropRotaryReloadWarning())


class RolloutEngine:
    """A vLLM engine on every rank of the world, fed with the trained weights.

    Collective: construct and call every method on all ranks, in the same order.

    Args:
        hf_model_dir: Hugging Face checkpoint vLLM starts from (config + weights; no
            tokenizer is needed: prompts are token ids).
        config: engine settings.
        dummy_weights: start with random weights instead of reading the checkpoint's
            (the trainer's first sync overwrites them anyway); generating before a
            :meth:`sync_weights` then raises.

    The replicas span the whole ``torch.distributed`` world (vLLM's external launcher
    builds its groups over the world), so every collective here is on the default
    group.
    """

    def __init__(
        self,
        hf_model_dir: str | os.PathLike,
        config: RolloutConfig | None = None,
        *,
        dummy_weights: bool = False,
    ):
        self.config = config = config or RolloutConfig()
        self.group = dist.group.WORLD
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.device = get_device()
        self.hf_model_dir = str(Path(hf_model_dir).absolute())
        error = None
        try:
            config.check_world_size(self.world_size)
            error = check_model(self.hf_model_dir, config)
        except ValueError as exc:
            error = str(exc)
        raise_if_any_rank(error, self.group, what="starting the vLLM rollout engine")

        self.model_config = PolicyModelConfig.from_hf(self.hf_model_dir)
        self.dtype = _vllm_dtype(config, self.model_config)
        self.expected_shapes = self.model_config.hf_weight_shapes()
        self.replica_size = config.tensor_parallel_size
        self.num_replicas = self.world_size // self.replica_size
        self.replica = self.rank // self.replica_size
        self._cuda_sleep = config.enable_sleep_mode and torch.cuda.is_available()
        self._asleep: set[str] = set()
        # No usable weights: started with dummy ones, slept at level 2, or a sync
        # failed part-way; cleared by the next complete sync.
        self._weights_lost = dummy_weights

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine
        from vllm import LLM

        _quiet_vllm(config.log_level)
        on_cpu = not torch.cuda.is_available()
        utilization = config.gpu_memory_utilization or (0.1 if on_cpu else 0.5)
        eager = config.enforce_eager if config.enforce_eager is not None else on_cpu
        kwargs = dict(
            model=self.hf_model_dir,
            skip_tokenizer_init=True,
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=self.replica_size,
            gpu_memory_utilization=utilization,
            max_model_len=config.max_model_len or self.model_config.max_position_embeddings,
            max_num_seqs=config.max_num_seqs,
            dtype=str(self.dtype).removeprefix("torch."),
            enforce_eager=eager,
            enable_prefix_caching=config.enable_prefix_caching,
            seed=config.seed,
            logprobs_mode="processed_logprobs",
        )
        if config.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
        if self._cuda_sleep:
            kwargs["enable_sleep_mode"] = True
        if dummy_weights:
            kwargs["load_format"] = "dummy"
        kwargs.update(config.engine_kwargs)
        if on_cpu:
            _job_unique_cpu_shm_names()
        with preserved_rng_state():
            self.llm = LLM(**kwargs)
        if on_cpu:
            _unlink_cpu_shm_names(self.group)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int = 0
    ) -> Generations:
        """Sample ``sampling.n`` responses per prompt; identical result on every rank.

        Prompts are split in contiguous, near-equal ranges over the rollout replicas;
        every sample has its own vLLM seed derived from ``(seed, prompt, sample)``, so
        the same seed and layout give the same samples.
        """
        from vllm import SamplingParams

        self._check_prompts(prompt_ids, "prompt_ids")
        self._wake(("weights", "kv_cache"))
        mine = split_evenly(len(prompt_ids), self.num_replicas)[self.replica]
        prompts, params = [], []
        for p in mine:
            for j in range(sampling.n):
                prompts.append({"prompt_token_ids": list(prompt_ids[p])})
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=sampling.top_k,
                        max_tokens=sampling.max_tokens,
                        stop_token_ids=list(sampling.stop_token_ids),
                        logprobs=0,
                        seed=sample_seed(seed, p, j),
                        detokenize=False,
                    )
                )
        ids, values, codes = [], [], []
        error = None
        try:
            if prompts:
                with preserved_rng_state():
                    outputs = self.llm.generate(prompts, params, use_tqdm=False)
                for out in outputs:
                    c = out.outputs[0]
                    tokens = list(c.token_ids)
                    ids.append(tokens)
                    values.append([c.logprobs[t][tok].logprob for t, tok in enumerate(tokens)])
                    if c.finish_reason not in FINISH_REASONS:
                        raise RuntimeError(f"vLLM ended a request with reason {c.finish_reason!r}")
                    codes.append(FINISH_REASONS.index(c.finish_reason))
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error = f"{type(exc).__name__}: {exc}"
            if "does not use offset" in str(exc):
                # vLLM rewinds a seeded sampler after a chunked (partial) prefill, which a
                # CPU generator cannot do.
                error += (
                    " (on CPU every prompt of a generate call must prefill in one scheduler "
                    "step: raise rollout.engine_kwargs.max_num_batched_tokens to at least "
                    "the prompt tokens of one call, and rollout.max_num_seqs to at least its "
                    "number of samples)"
                )
        # One replica failing must not leave the others waiting in the gather.
        raise_if_any_rank(error, self.group, what="rollout generation")
        rows = gather_replica_rows(
            ids, values, codes, self.replica_size, self._comm_device(), self.group
        )
        return make_generations(prompt_ids, sampling.n, *rows)

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """vLLM's log-probs of fixed token sequences (temperature 1, no sampling):
        entry ``t - 1`` of row ``i`` is ``log p(seq[t] | seq[:t])``; identical on every
        rank. A check of vLLM's weights against another implementation."""
        from vllm import SamplingParams

        self._check_prompts(sequences, "sequences")
        self._wake(("weights", "kv_cache"))
        mine = split_evenly(len(sequences), self.num_replicas)[self.replica]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        ids, values = [], []
        if len(mine):
            with preserved_rng_state():
                outputs = self.llm.generate(
                    [{"prompt_token_ids": list(sequences[i])} for i in mine], params, use_tqdm=False
                )
            for i, out in zip(mine, outputs, strict=True):
                seq = list(sequences[i])
                ids.append(seq[1:])
                values.append([out.prompt_logprobs[t][seq[t]].logprob for t in range(1, len(seq))])
        _, values, _ = gather_replica_rows(
            ids, values, [0] * len(ids), self.replica_size, self._comm_device(), self.group
        )
        return values

    def _check_prompts(self, prompts: Sequence[Sequence[int]], name: str) -> None:
        """Every rank holds every prompt, so each rank finds the same error (no rank
        is left waiting for a replica that vLLM would fail)."""
        vocab = self.model_config.vocab_size
        for i, p in enumerate(prompts):
            if not 0 < len(p) < self.max_model_len:
                raise ValueError(
                    f"{name}[{i}] has {len(p)} tokens: expected 1 to {self.max_model_len - 1} "
                    f"(rollout.max_model_len={self.max_model_len})"
                )
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"{name}[{i}] has token ids outside [0, vocab_size={vocab})")

    # ------------------------------------------------------------------ weights
    def sync_weights(
        self,
        model_chunks: Sequence[torch.nn.Module],
        model_config: PolicyModelConfig,
        *,
        tp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
        bucket_mb: float | None = None,
        measure_memory: bool = False,
    ) -> dict[str, float]:
        """Load the megatron model's current weights into vLLM (every rank).

        Streams :func:`covrl.models.export_hf_weights` (collective over each
        model-parallel group, groups default to megatron's) through a
        :class:`BucketedWeightStream` into one in-place ``reload_weights`` of this
        rank's vLLM worker, then drops vLLM's prefix cache (its KV was computed with
        the old weights). Returns this rank's ``time_s``, ``bytes``, ``tensors``,
        ``buckets``, ``peak_bucket_bytes``, ``largest_tensor_bytes``, ``gb_per_s``, the
        export's ``pp_bytes_received``/``pp_bytes_sent`` (over the pipeline group) and
        ``tp_bytes_received``/``tp_bytes_sent`` (over the tensor group), and
        with ``measure_memory`` ``peak_extra_bytes``: the peak memory of the load beyond
        what was in use before it (:func:`covrl.rollout.memory.peak_extra_memory`).
        Raises on every rank, before anything is loaded, when ``model_config``'s
        tensors differ from the checkpoint's vLLM was started with.
        """
        start = time.perf_counter()
        error = shape_errors(
            self.expected_shapes,
            model_config.hf_weight_shapes(),
            f"weight sync of {model_config.model_type} model into vLLM ({self.hf_model_dir})",
        )
        raise_if_any_rank(error, self.group, what="weight sync")
        self._wake(("weights",))
        bucket_mb = self.config.sync_bucket_mb if bucket_mb is None else bucket_mb
        export = ExportStats()
        stream = BucketedWeightStream(
            export_hf_weights(
                model_chunks,
                model_config,
                dtype=self.dtype,
                tp_group=tp_group,
                pp_group=pp_group,
                stats=export,
            ),
            self.expected_shapes,
            bucket_bytes=max(1, int(bucket_mb * 2**20)),
            dtype=self.dtype,
            device=self.device,
        )

        def load() -> None:
            with torch.no_grad():
                self.llm.collective_rpc(
                    "reload_weights",
                    kwargs={"weights_iterator": iter(stream), "is_checkpoint_format": True},
                )

        try:
            if measure_memory:
                _, peak = peak_extra_memory(load, self.device)
            else:
                load()
        except BaseException:
            # A stream that failed part-way leaves layers half reloaded.
            self._weights_lost = True
            raise
        if self.model_config.tie_word_embeddings:
            self.llm.collective_rpc(_reprocess_shared_weight_layers)
        self.llm.reset_prefix_cache()
        self._weights_lost = False
        metrics = stream.stats.metrics()
        metrics.update(export.metrics())
        metrics["time_s"] = time.perf_counter() - start
        metrics["gb_per_s"] = metrics["bytes"] / 1e9 / metrics["time_s"]
        if measure_memory:
            metrics["peak_extra_bytes"] = float(peak)
        return metrics

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Release vLLM's KV cache and weights until the next sync / generate (CUDA with
        ``enable_sleep_mode``; a no-op on CPU, where vLLM has no sleep mode). Level 2:
        the weights are not backed up, the next :meth:`sync_weights` rewrites them."""
        if self._cuda_sleep and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = {"weights", "kv_cache"}
            self._weights_lost = True

    @property
    def weights_released(self) -> bool:
        """Whether vLLM holds no usable weights (dummy start, sleep, failed sync) until
        the next :meth:`sync_weights`."""
        return self._weights_lost

    def shutdown(self) -> None:
        """Stop the in-process engine core (this also destroys the default process
        group under the external launcher: call it last)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _wake(self, tags: Sequence[str]) -> None:
        if "kv_cache" in tags and self._weights_lost:
            raise RuntimeError(
                "vLLM holds no usable weights (started with dummy weights, released by "
                "sleep(), or a failed sync): call sync_weights() before generating"
            )
        pending = [t for t in tags if t in self._asleep]
        if pending:
            self.llm.wake_up(tags=pending)
            self._asleep.difference_update(pending)

    def _comm_device(self) -> torch.device:
        # NCCL collectives need CUDA tensors, gloo ones CPU tensors.
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
