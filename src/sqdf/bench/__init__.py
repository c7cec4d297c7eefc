"""`sqdf bench`: equal-budget runs of every method on every task (``runs``), run in a process pool (``pool``),
aggregated into tables (``tables``) and plots (``plots``), the discretization study (``discretization``,
``discretization_study``) and the black-box bench (``blackbox``)."""
