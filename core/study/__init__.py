"""Studies: a grid of runs (arms x seeds) trained by ``core.run`` and reported as tables and plots.

    python -m core.study zoo/studies/collapse_digits.toml              # run what is missing, report
    python -m core.study zoo/studies/collapse_digits.toml --jobs 2     # two runs at a time
    python -m core.study zoo/studies/collapse_digits.toml --report     # redraw the report only
    specreg study zoo/studies/collapse_digits.toml

- :mod:`core.study.spec`: the study file (arms, seeds, what to compare, the collapse rule),
  validated like a recipe.
- :mod:`core.study.runs`: one run folder per (arm, seed) and its state (new, interrupted, finished).
- :mod:`core.study.executors`: ``local`` (subprocesses on this machine) and ``slurm`` (submitit).
- :mod:`core.study.results` / :mod:`core.study.report` / :mod:`core.study.plots`: the report.
"""
