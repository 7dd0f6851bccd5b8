"""The benchmark harness behind ``benchmarks/throughput.py`` (a thin command line over it),
also used by ``gam_breakdown.py``, ``model_rows.py`` and ``_bench_common.py``. Import it as
``harness`` with ``benchmarks/`` on ``sys.path`` (as those scripts and pytest arrange).

One file per job:

* ``config.py``   - a run's settings (``Config``), per-device defaults, shape and dtype text;
* ``cache.py``    - the last-level cache size (sysfs, lscpu, CUDA L2) and the input rotation
  that keeps timed inputs out of it (why rotation: its docstring);
* ``backends.py`` - which fused backends run a module (its fused class's ``hot_paths``), the
  one place that decides it;
* ``variants.py`` - modules, rotated inputs, the variants (memcpy, eager, compile, sdpa,
  fused-<backend>) and their forward / fwd+bwd steps;
* ``timing.py``   - CPU and CUDA timers, interleaved rounds (``run_phase``), ``PhaseResult``;
* ``rows.py``     - the module table's rows (the CSV columns), ratios, the printed table;
* ``table.py``    - fixed-width text table cells and lines (module and model tables);
* ``machine.py``  - device description, CPU load, the JSON metadata;
* ``output.py``   - CSV, JSON and the PNG chart;
* ``run.py``      - a case's two phases, the model rows, the progress lines, the whole run.
"""
