"""``python -m llamalab.eval.lm_eval_cli ...``: lm-eval's command line, with llamalab.

lm-eval 0.4.13 cannot load a model plugin by itself (its registry has no entry-point
discovery), so this registers ``--model llamalab`` and then runs lm-eval's own CLI with
the same arguments, e.g.::

    python -m llamalab.eval.lm_eval_cli --model llamalab --model_args model=REF,dtype=float32 \\
        --tasks my_task --include_path tasks/
"""

from __future__ import annotations

import sys


def main() -> None:
    """Register the llamalab model, then hand ``sys.argv`` to lm-eval's CLI."""
    from lm_eval.__main__ import cli_evaluate

    from llamalab.eval.lm_eval_backend import register

    register()
    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
