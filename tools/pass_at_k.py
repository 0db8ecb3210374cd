"""pass@k and answer diversity of a policy checkpoint, sampled through vLLM.

'eval' samples N responses per prompt of verl-layout parquet files with covrl's vLLM
rollout engine, scores them with the reward function of each prompt's data_source
(covrl.rewards, as the trainer does) and writes a JSON: pass@k for k = 1..N (the
unbiased estimator 1 - C(N-c, k) / C(N, k), averaged over prompts), the sampled
accuracy (= pass@1), the number of distinct correct answers per prompt and their mean,
the sampling settings and the checkpoint. 'plot' draws pass@k against k for one or
more such JSONs.

    # the tiny task's base model on its validation prompts, with the recipe's reward,
    # response length and vLLM settings (--config), 64 samples per prompt:
    python tools/pass_at_k.py eval --model cache/tiny_task/model \
        --config examples/tiny_kl_cov.yaml --out outputs/pass_at_k/base.json
    # a trained policy: the run's Hugging Face export and resolved config
    python tools/pass_at_k.py eval --model outputs/tiny_kl_cov/hf \
        --config outputs/tiny_kl_cov/config.yaml --out outputs/pass_at_k/kl_cov.json
    # any checkpoint and prompt file, no config
    python tools/pass_at_k.py eval --model MODEL_DIR --data prompts.parquet -n 16 \
        --max-tokens 1024 --out result.json
    python tools/pass_at_k.py plot outputs/pass_at_k/base.json outputs/pass_at_k/kl_cov.json \
        --labels base,kl_cov --out outputs/pass_at_k/pass_at_k.png
    torchrun --nproc_per_node 2 tools/pass_at_k.py eval ...   # prompts split over ranks

Errors are reported as one line on stderr with exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covrl.analysis.pass_at_k import PassAtKError, PassAtKResult, summarize
from covrl.analysis.plots import add_figure_arguments
from covrl.tasks.answers import answer_key

if TYPE_CHECKING:
    from covrl.config import DataConfig, RewardConfig
    from covrl.data import PromptDataset
    from covrl.rollout import RolloutConfig, SamplingConfig

DEFAULT_N = 64
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_NUM_SEQS = 512
_RULES = (
    "A sample is correct when its scorer's 'acc' (else its reward) is > 0. Two correct "
    "samples give the same answer when their answer keys match: for two_sum the ordered "
    "pair of the last \\boxed{a+b} (45+28 and 28+45 are two answers), for other scorers "
    "the content of the last \\boxed{...} without whitespace (else the whole response). "
    "See docs/pass_at_k.md."
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _source_spec(text: str) -> tuple[str, str]:
    source, sep, spec = text.partition("=")
    if not sep or not source or not spec:
        raise argparse.ArgumentTypeError(
            f"expected DATA_SOURCE=SCORER (e.g. two_sum=two_sum or "
            f"my_source=pkg.module:function), got {text!r}"
        )
    return source, spec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pass_at_k.py",
        description=__doc__,
        epilog=textwrap.fill(_RULES, 88),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser(
        "eval",
        help="sample, score and write a pass@k JSON",
        description="Sample N responses per prompt with vLLM (one process, or every rank of "
        "torchrun), score them and write OUT (JSON): n, num_prompts, accuracy, "
        "mean_distinct_correct, k and pass_at_k (pass_at_k[k-1] = pass@k), per prompt "
        "'correct' and 'distinct_correct', the settings and the timings. Progress is "
        "printed after every vLLM call.",
        epilog=_RULES,
    )
    ev.add_argument(
        "--model",
        required=True,
        type=Path,
        help="Hugging Face checkpoint directory with its tokenizer (a run's hf/ export, or "
        "the base model, e.g. cache/tiny_task/model)",
    )
    ev.add_argument(
        "--data",
        nargs="+",
        type=Path,
        default=None,
        metavar="PARQUET",
        help="prompt files in verl's layout (default: --config's data.val_files)",
    )
    ev.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the run's config.yaml (or its training YAML): reward.*, rollout.*, "
        "sampling.max_tokens and stop_token_ids, data.max_prompt_length, prompt_key and "
        "apply_chat_template are taken from it; the options below override them",
    )
    ev.add_argument("--out", required=True, type=Path, help="output JSON file")
    ev.add_argument(
        "-n",
        "--num-samples",
        dest="n",
        type=_positive_int,
        default=DEFAULT_N,
        help="samples per prompt; pass@k is reported for k = 1..n (default: %(default)s)",
    )
    ev.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature (default: %(default)s)",
    )
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: off)")
    ev.add_argument("--top-k", type=int, default=-1, help="top-k sampling (default: -1, off)")
    ev.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        help=f"response length limit (default: --config's sampling.max_tokens, else "
        f"{DEFAULT_MAX_TOKENS}; lowered to what the model's context leaves after the "
        "longest prompt)",
    )
    ev.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed: the same seed, settings and --max-num-seqs give the same "
        "samples (default: %(default)s)",
    )
    ev.add_argument(
        "--max-prompts",
        type=_positive_int,
        default=None,
        help="use only the first N prompts (default: all)",
    )
    ev.add_argument(
        "--reward-source",
        action="append",
        type=_source_spec,
        default=[],
        metavar="SOURCE=SCORER",
        help="scorer of a data source, as reward.sources: a built-in (math, two_sum) or "
        "module:function / file.py:function; repeatable",
    )
    ev.add_argument(
        "--reward-default",
        default=None,
        metavar="SCORER",
        help="scorer of data sources known nowhere, as reward.default ('none': an error; "
        "default: --config's, else math)",
    )
    ev.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=None,
        help=f"samples per vLLM call: prompts are sampled max(1, this // n) at a time "
        f"(default: --config's rollout.max_num_seqs, else {DEFAULT_MAX_NUM_SEQS})",
    )
    ev.add_argument(
        "--tp",
        type=_positive_int,
        default=None,
        help="vLLM tensor-parallel size; under torchrun the world is split into replicas of "
        "this many ranks, each sampling its share of the prompts (default: --config's "
        "rollout.tensor_parallel_size, else 1)",
    )
    ev.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="vLLM context length (default: the checkpoint's max_position_embeddings)",
    )
    ev.add_argument(
        "--kv-cache-mb",
        type=_positive_int,
        default=None,
        help="vLLM KV cache size in MiB (default: vLLM sizes it from its memory fraction)",
    )
    ev.add_argument(
        "--save-samples",
        action="store_true",
        help="also store every response, its correctness and answer key in the JSON",
    )
    ev.add_argument(
        "--plot", type=Path, default=None, metavar="PNG", help="also draw this result's pass@k"
    )

    pl = sub.add_parser(
        "plot",
        help="draw pass@k against k for one or more JSONs",
        description="pass@k against k (log x) for each JSON written by 'eval' (top) and its "
        "distinct correct answers per prompt (bottom), one colour per JSON.",
    )
    pl.add_argument("results", nargs="+", type=Path, metavar="JSON", help="results of 'eval'")
    pl.add_argument(
        "--labels",
        default=None,
        help="comma-separated names, one per JSON (default: the file names without .json)",
    )
    pl.add_argument("--out", required=True, type=Path, help="output PNG file")
    add_figure_arguments(pl)
    return parser


class ToolError(Exception):
    """A problem with the tool's inputs, reported as one line."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ToolError(f"{path}: file does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolError(f"{path}: not a readable JSON file ({exc})") from None
    return data


# ---------------------------------------------------------------------------- eval
def _checkpoint_context(model: Path) -> int:
    """max_position_embeddings of the checkpoint at ``model`` (checked to be one)."""
    if not model.is_dir():
        raise ToolError(f"--model {model}: directory does not exist")
    config = model / "config.json"
    if not config.is_file():
        raise ToolError(f"--model {model}: not a Hugging Face checkpoint (no config.json)")
    length = _read_json(config).get("max_position_embeddings")
    if not isinstance(length, int) or length < 2:
        raise ToolError(f"{config}: field max_position_embeddings={length!r}: expected an integer")
    return length


@dataclass
class Settings:
    """The run config's sections the evaluation uses (or their defaults) with the
    command line's overrides applied, and the checkpoint's context length."""

    files: list[Path]
    data: DataConfig
    reward: RewardConfig
    rollout: RolloutConfig
    max_tokens: int
    stop_token_ids: list[int]
    context: int


def _settings(args: argparse.Namespace) -> Settings:
    from covrl.config import ConfigError, DataConfig, RewardConfig, load_config
    from covrl.rollout import RolloutConfig

    context = _checkpoint_context(args.model)
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise ToolError(f"--config {args.config}: {exc}") from None
        s = Settings(
            files=[Path(f) for f in config.data.val_files],
            data=config.data,
            reward=config.reward,
            rollout=config.rollout,
            max_tokens=config.sampling.max_tokens,
            stop_token_ids=list(config.sampling.stop_token_ids),
            context=context,
        )
    else:
        s = Settings(
            files=[],
            data=DataConfig(train_files=[]),
            reward=RewardConfig(),
            rollout=RolloutConfig(max_num_seqs=DEFAULT_MAX_NUM_SEQS),
            max_tokens=DEFAULT_MAX_TOKENS,
            stop_token_ids=[],
            context=context,
        )
    where = "--data"
    if args.data is not None:
        s.files = args.data
    elif s.files:
        where = f"data.val_files of --config {args.config}"
    else:
        raise ToolError("no prompt files: pass --data, or --config with data.val_files")
    for f in s.files:
        if not f.is_file():
            raise ToolError(f"{where}: {f}: file does not exist")
    s.reward.sources = {**s.reward.sources, **dict(args.reward_source)}
    if args.reward_default is not None:
        s.reward.default = None if args.reward_default.lower() == "none" else args.reward_default
    if args.max_num_seqs is not None:
        s.rollout.max_num_seqs = args.max_num_seqs
    if args.tp is not None:
        s.rollout.tensor_parallel_size = args.tp
    if args.max_model_len is not None:
        s.rollout.max_model_len = args.max_model_len
    if args.kv_cache_mb is not None:
        s.rollout.kv_cache_memory_bytes = args.kv_cache_mb << 20
    if args.max_tokens is not None:
        s.max_tokens = args.max_tokens
    s.rollout.seed = args.seed
    return s


@dataclass
class Setup:
    """What every rank holds before sampling."""

    tokenizer: Any
    dataset: PromptDataset
    specs: dict[str, str]  # data source -> scorer
    timeout_s: float  # per-sample scoring limit
    sampling: SamplingConfig
    rollout: RolloutConfig
    prompts_per_call: int


@dataclass
class Outcome:
    """Rank 0's per-prompt outcomes (``[prompts][n]``) and response statistics."""

    correct: list[list[bool]] = field(default_factory=list)
    keys: list[list[str | None]] = field(default_factory=list)
    samples: list[list[dict]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    timed_out: int = 0


def _log(message: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(message, flush=True)


def _prepare(args: argparse.Namespace, s: Settings) -> Setup:
    """Tokenizer, prompts, scorers and the engine's settings (every rank)."""
    import torch

    from covrl.data import DataError, load_policy_tokenizer, load_prompt_dataset
    from covrl.rewards import RewardError, RewardRegistry
    from covrl.rollout import SamplingConfig

    max_model_len = s.rollout.max_model_len or s.context
    try:
        tokenizer = load_policy_tokenizer(
            args.model, require_chat_template=s.data.apply_chat_template
        )
        dataset = load_prompt_dataset(
            [os.fspath(f) for f in s.files],
            tokenizer,
            max_prompt_length=min(s.data.max_prompt_length, max_model_len - 1),
            prompt_key=s.data.prompt_key,
            apply_chat_template=s.data.apply_chat_template,
            max_prompts=args.max_prompts,
        )
        specs = RewardRegistry(s.reward.sources, s.reward.default).check(dataset.data_sources)
    except (DataError, RewardError) as exc:
        raise ToolError(str(exc)) from None
    stop = s.stop_token_ids
    if not stop and tokenizer.eos_token_id is not None:
        stop = [int(tokenizer.eos_token_id)]
    longest = max(len(r.prompt_ids) for r in dataset.records)
    max_tokens = s.max_tokens
    if max_tokens > max_model_len - longest:
        _log(
            f"max_tokens {max_tokens} -> {max_model_len - longest}: the context is "
            f"{max_model_len} tokens and the longest prompt {longest}"
        )
        max_tokens = max_model_len - longest
    try:
        sampling = SamplingConfig(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=max_tokens,
            stop_token_ids=stop,
        )
        rollout = s.rollout
        rollout.check_world_size(int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    per_call = max(1, rollout.max_num_seqs // args.n)
    rollout.max_num_seqs = per_call * args.n
    rollout.max_model_len = max_model_len
    if not torch.cuda.is_available():
        # vLLM's CPU runner cannot rewind a seeded sampler after a chunked prefill: every
        # prompt of a call must prefill in one scheduler step.
        kwargs = dict(rollout.engine_kwargs)
        kwargs["max_num_batched_tokens"] = max(
            int(kwargs.get("max_num_batched_tokens", 0)), rollout.max_num_seqs * longest
        )
        rollout.engine_kwargs = kwargs
    return Setup(tokenizer, dataset, specs, s.reward.timeout_s, sampling, rollout, per_call)


def _sample_and_score(args, setup: Setup, engine, seconds: dict) -> Outcome:
    """Sample every prompt, ``prompts_per_call`` prompts per vLLM call, and score the
    samples on rank 0 as they come (the other ranks only sample)."""
    import torch.distributed as dist

    from covrl.rewards import RewardError, RewardExecutor, ScoreRequest
    from covrl.rollout import sample_seed

    rank, n = dist.get_rank(), args.n
    records, specs = setup.dataset.records, setup.specs
    out = Outcome()
    executor = RewardExecutor(setup.timeout_s) if rank == 0 else None
    try:
        for first in range(0, len(records), setup.prompts_per_call):
            chunk = records[first : first + setup.prompts_per_call]
            t0 = time.perf_counter()
            # One seed per call, derived from (--seed, the call's first prompt) as a
            # sample's is: calls never share their samples' seeds.
            gens = engine.generate(
                [r.prompt_ids for r in chunk], setup.sampling, seed=sample_seed(args.seed, first, 0)
            )
            seconds["generate"] += time.perf_counter() - t0
            if rank != 0:
                continue
            t0 = time.perf_counter()
            texts = [
                setup.tokenizer.decode(ids, skip_special_tokens=True) for ids in gens.response_ids
            ]
            requests = [
                ScoreRequest(
                    spec=specs[r.data_source],
                    data_source=r.data_source,
                    solution_str=text,
                    ground_truth=r.ground_truth,
                    extra_info=r.extra_info,
                    source=r.source,
                )
                for r, text in zip((chunk[p] for p in gens.prompt_index), texts, strict=True)
            ]
            try:
                results = executor.score(requests)
            except RewardError as exc:
                raise ToolError(str(exc)) from None
            seconds["score"] += time.perf_counter() - t0
            out.lengths += gens.response_lengths
            out.truncated += gens.finish_reasons.count("length")
            out.timed_out += sum(r.timed_out for r in results)
            for p, record in enumerate(chunk):
                rows = range(p * n, (p + 1) * n)  # samples are prompt-major
                ok = [results[i].acc > 0 for i in rows]
                keys = [answer_key(specs[record.data_source], texts[i]) for i in rows]
                out.correct.append(ok)
                out.keys.append(keys)
                out.samples.append(
                    [
                        {"response": texts[i], "correct": c, "answer": k}
                        for i, c, k in zip(rows, ok, keys, strict=True)
                    ]
                )
            done = len(out.correct)
            _log(
                f"prompts {done}/{len(records)}: {done * n} samples, accuracy so far "
                f"{sum(map(sum, out.correct)) / (done * n):.3f}, "
                f"{seconds['generate']:.1f} s sampling, {seconds['score']:.1f} s scoring"
            )
    finally:
        if executor is not None:
            executor.close()
    return out


def _evaluate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    # Paths and settings first: a mistake there costs no process group or vLLM start.
    settings = _settings(args)
    import torch.distributed as dist

    from covrl.parallel import destroy, init_process_group, liveness
    from covrl.rollout import RolloutEngine

    init_process_group()
    engine = None
    try:
        setup = _prepare(args, settings)
        dataset, sampling = setup.dataset, setup.sampling
        dropped = dataset.num_dropped_too_long
        _log(
            f"{len(dataset)} prompts from {', '.join(map(os.fspath, settings.files))}"
            + (f" ({dropped} longer than the context left out)" if dropped else "")
            + f"; {args.n} samples each, {setup.prompts_per_call} prompts per vLLM call, "
            f"temperature {sampling.temperature}, max_tokens {sampling.max_tokens}; "
            f"scorers {setup.specs}"
        )
        t0 = time.perf_counter()
        engine = RolloutEngine(args.model, setup.rollout)
        seconds = {"setup": t0 - start, "engine_start": time.perf_counter() - t0}
        seconds.update(generate=0.0, score=0.0)
        _log(f"vLLM started in {seconds['engine_start']:.1f} s")
        outcome = _sample_and_score(args, setup, engine, seconds)
        if dist.get_rank() != 0:
            return 0
        result = summarize(
            outcome.correct,
            outcome.keys,
            [
                {"source": r.source, "data_source": r.data_source, "ground_truth": r.ground_truth}
                for r in dataset.records
            ],
        )
        seconds["total"] = time.perf_counter() - start
        _write(args, settings, setup, result, outcome, seconds)
        return 0
    finally:
        if engine is None:
            destroy()
        else:
            # vLLM's shutdown destroys every process group (and with it rank 0's store):
            # this rank's heartbeat stops first, and nothing is destroyed twice.
            liveness.stop()
            engine.shutdown()


def _write(
    args, settings: Settings, setup: Setup, result: PassAtKResult, outcome: Outcome, seconds: dict
) -> None:
    from covrl.utils.atomic_io import write_text_atomic

    sampling, lengths = setup.sampling, outcome.lengths
    out = result.to_dict()
    if args.save_samples:
        for prompt, rows in zip(out["prompts"], outcome.samples, strict=True):
            prompt["samples"] = rows
    out.update(
        checkpoint=os.fspath(args.model.absolute()),
        data=[os.fspath(f) for f in settings.files],
        config=None if args.config is None else os.fspath(args.config),
        sampling={
            "n": sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "max_tokens": sampling.max_tokens,
            "stop_token_ids": list(sampling.stop_token_ids),
            "seed": args.seed,
            "prompts_per_call": setup.prompts_per_call,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "rollout_tp": setup.rollout.tensor_parallel_size,
        },
        reward={"scorers": setup.specs, "timeout_s": setup.timeout_s},
        num_prompts_dropped_too_long=setup.dataset.num_dropped_too_long,
        response_length_mean=sum(lengths) / len(lengths),
        truncated_fraction=outcome.truncated / len(lengths),
        timed_out=outcome.timed_out,
        seconds=seconds,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(out, indent=1) + "\n")
    if args.plot is not None:
        from covrl.analysis.plots import plot_pass_at_k

        plot_pass_at_k([(args.out.stem, result)], args.plot)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < result.n] + [result.n]
    print(
        f"{args.out}: accuracy {result.accuracy:.4f}, "
        + ", ".join(f"pass@{k} {result.at(k):.4f}" for k in ks)
        + f", distinct correct answers per prompt {result.mean_distinct_correct:.2f}"
        + (f", {outcome.timed_out} samples timed out (scored 0)" if outcome.timed_out else "")
        + f" ({seconds['total']:.1f} s: vLLM start {seconds['engine_start']:.1f}, "
        f"sampling {seconds['generate']:.1f}, scoring {seconds['score']:.1f})",
        flush=True,
    )


# ---------------------------------------------------------------------------- plot
def _plot(args: argparse.Namespace) -> int:
    from covrl.analysis.plots import plot_pass_at_k

    labels = args.labels.split(",") if args.labels else [p.stem for p in args.results]
    if len(labels) != len(args.results):
        raise ToolError(f"--labels has {len(labels)} names for {len(args.results)} JSON files")
    results = [
        (label, PassAtKResult.from_dict(_read_json(path), os.fspath(path)))
        for label, path in zip(labels, args.results, strict=True)
    ]
    print(plot_pass_at_k(results, args.out, size=args.size, dpi=args.dpi))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"eval": _evaluate, "plot": _plot}[args.command](args)
    except (ToolError, PassAtKError) as exc:
        print(f"pass_at_k: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
