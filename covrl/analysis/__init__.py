"""Analysis of training runs: the entropy-performance law ``R = -a exp(H) + b``.

``entropy_law``: the closed-form fit, held-out prediction error and the live
:class:`EntropyLawMonitor`; ``run_logs``: TensorBoard / JSON lines / CSV scalar logs;
``report``: per-run analysis and the markdown comparison; ``plots``: PNG figures
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
    "fit_entropy_law",
    "fit_prefix",
    "format_analysis",
    "load_run",
    "prediction_error",
    "read_csv",
    "read_jsonl",
    "read_tensorboard",
    "summarize_run",
]
