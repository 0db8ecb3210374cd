"""Analysis of training runs: the entropy-performance law ``R = -a exp(H) + b``, and
pass@k and answer diversity of a policy's samples.

``entropy_law``: the closed-form fit, held-out prediction error and the live
:class:`EntropyLawMonitor`; ``run_logs``: TensorBoard / JSON lines / CSV scalar logs;
``report``: per-run analysis and the markdown comparison; ``pass_at_k``: the unbiased
pass@k estimator and distinct correct answers per prompt; ``plots``: PNG figures
(matplotlib is imported only when a figure is drawn).
"""

from covrl.analysis.entropy_law import (
    EntropyLawError,
    EntropyLawFit,
    EntropyLawMonitor,
    EntropyLawMonitorConfig,
    HeldOutError,
    fit_entropy_law,
    fit_prefix,
    prediction_error,
)
from covrl.analysis.pass_at_k import (
    PassAtKError,
    PassAtKResult,
    PromptResult,
    count_distinct_correct,
    mean_pass_at_k,
    pass_at_k_curve,
    summarize,
)
from covrl.analysis.report import (
    DEFAULT_ACCURACY_TAG,
    DEFAULT_ENTROPY_TAG,
    RunAnalysis,
    RunSummary,
    Tags,
    analysis_dict,
    analyze_run,
    compare_table,
    format_analysis,
    summarize_run,
)
from covrl.analysis.run_logs import (
    RunLog,
    RunLogError,
    Series,
    align,
    load_run,
    read_csv,
    read_jsonl,
    read_tensorboard,
)

__all__ = [
    "DEFAULT_ACCURACY_TAG",
    "DEFAULT_ENTROPY_TAG",
    "EntropyLawError",
    "EntropyLawFit",
    "EntropyLawMonitor",
    "EntropyLawMonitorConfig",
    "HeldOutError",
    "PassAtKError",
    "PassAtKResult",
    "PromptResult",
    "RunAnalysis",
    "RunLog",
    "RunLogError",
    "RunSummary",
    "Series",
    "Tags",
    "align",
    "analysis_dict",
    "analyze_run",
    "compare_table",
    "count_distinct_correct",
    "fit_entropy_law",
    "fit_prefix",
    "format_analysis",
    "load_run",
    "mean_pass_at_k",
    "pass_at_k_curve",
    "prediction_error",
    "read_csv",
    "read_jsonl",
    "read_tensorboard",
    "summarize",
    "summarize_run",
]
