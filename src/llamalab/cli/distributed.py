"""Commands under ``torchrun``: tensor-parallel ranks for ``generate``, ``chat``, ``eval``
and ``serve``.

``run_command`` runs any command. Outside a multi-rank launch (``$WORLD_SIZE`` unset or
1) it only calls the command. Under one, the model commands join the other ranks
(``parallel/launch.py``): rank 0 runs the command (reads the chat's input, owns the
server's socket), each other rank follows it, holding its slices of the model. The rest
(``train``, ``finetune``) keep their own torchrun handling.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from llamalab.errors import LlamalabError

RANKED = ("generate", "chat", "eval", "serve")  # commands that run on tensor-parallel ranks


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    """``--dist-timeout``: how long a rank waits on the others under torchrun;
    ``--tp-exact``: the split that gives one process's float logits bit for bit."""
    from llamalab.parallel.launch import DEFAULT_TIMEOUT

    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="under torchrun: seconds a rank waits on the others before the job ends "
        f"with an error (a rank died or hangs; default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--tp-exact",
        action="store_true",
        help="under torchrun: split wo and w2 by their outputs and gather their inputs, so "
        "that every sum is one process's and float logits equal its own bit for bit "
        "(four collectives per block instead of two)",
    )


def shared_scorer(model, **kwargs):
    """A :class:`~llamalab.eval.likelihood.LikelihoodScorer` on ``model``; under
    tensor parallelism every rank builds its own and runs each scoring call with rank 0."""
    from llamalab.eval.likelihood import LikelihoodScorer
    from llamalab.parallel.launch import current

    scorer = LikelihoodScorer(model, **kwargs)
    session = current()
    if session is not None:
        session.share(scorer, "scorer", ("score_many", "score", "token_logprobs"), **kwargs)
    return scorer


def _factories() -> dict:
    def scorer(model, **kwargs):
        from llamalab.eval.likelihood import LikelihoodScorer

        return LikelihoodScorer(model, **kwargs)

    return {"scorer": scorer}


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signal.SIGTERM)


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``: in this process, or as one of torchrun's ranks."""
    from llamalab.parallel.launch import world_size

    if args.command not in RANKED or world_size() == 1:
        return args.func(args)
    from llamalab.parallel import launch

    timeout = getattr(args, "dist_timeout", launch.DEFAULT_TIMEOUT)
    session = launch.start(
        timeout=timeout,
        device=getattr(args, "device", None),
        exact=getattr(args, "tp_exact", False),
    )
    if session.rank != 0:
        return session.follow(_factories())
    # SIGTERM ends rank 0 through its `finally`, which tells the other ranks to stop (a
    # server re-raises it once drained; the default action would end this process first).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    status = 1
    try:
        status = args.func(args)
    except launch.RanksLost as exc:
        # Nothing can be said to the other ranks any more: one line, and out at once
        # (leaving a broken process group can wait on the lost rank).
        session.report(str(exc))
        sys.stdout.flush()
        os._exit(1)
    except LlamalabError as exc:
        session.report(str(exc))  # as cli.main would print it: this process ends here
        status = 1
    except KeyboardInterrupt:
        print("llamalab: interrupted", file=sys.stderr)
        status = 130
    except BrokenPipeError:  # the reader went away: quietly, as cli.main does
        status = 0
    except SystemExit as exc:  # SIGTERM: the other ranks end with the same status
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        session.close(status)  # a defect: its traceback, after the other ranks stop
        raise
    # Out at once once the others are told, as they go: tearing the process group down
    # (or freeing it at interpreter exit) while the peers close their connections can make
    # gloo abort this process ("terminate called without an active exception").
    session.close(status, leave=False)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)
