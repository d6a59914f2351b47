"""Benchmark suites (`mhpfl bench`), cached resumable runs, the report (`mhpfl report`) and the
regression check (`mhpfl check`).

  suite.py   suite files (TOML) -> validated run configurations with cache keys
  runner.py  runs a suite: cache, atomic run directories, worker processes, progress
  report.py  tables (Markdown, CSV, LaTeX), plots (PNG, PDF) and the results README
  check.py   the regression check against results/smoke/reference.json
  cli.py     the `bench`, `report` and `check` commands
"""
