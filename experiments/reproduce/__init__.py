"""``make reproduce``: the paper's entropy experiments on the built-in tiny task.

- :mod:`~experiments.reproduce.paper`: the paper's settings and reported numbers;
- :mod:`~experiments.reproduce.plan`: the runs (:func:`default_plan`, :class:`RunSpec`);
- :mod:`~experiments.reproduce.runner`: runs a plan as trainer jobs, keeps finished ones;
- :mod:`~experiments.reproduce.numbers`, :mod:`~experiments.reproduce.figures`,
  :mod:`~experiments.reproduce.report`: the report, computed from the runs' metrics.

``tools/reproduce.py`` is the command line.
"""
