"""Prompt data: verl-layout parquet files -> chat-templated token ids; resumable sampling."""

from covrl.data.prompts import (
    DataError,
    PromptDataset,
    PromptRecord,
    load_policy_tokenizer,
    load_prompt_dataset,
)
from covrl.data.sampler import EpochSampler

__all__ = [
    "DataError",
    "EpochSampler",
    "PromptDataset",
    "PromptRecord",
    "load_prompt_dataset",
    "load_policy_tokenizer",
]
