"""lm-eval tasks shipped with rankwise, offline: each a YAML file (with its loader and data beside it) that
:func:`rankwise.eval.tasks.task_manager` always adds to lm-eval's task index, so ``rankwise eval --tasks NAME`` finds
it from any directory without ``--task-dir``."""
