"""Built-in tasks: datasets in verl's parquet layout, their reward functions, and the
tokenizer and base model they are trained with."""

from covrl.tasks import two_sum
from covrl.tasks.tokenizer import load_task_tokenizer, train_tokenizer

__all__ = ["load_task_tokenizer", "train_tokenizer", "two_sum"]
