"""The ``jaxtl`` command: argument parsing only; the work is in library functions.

jaxtl finetune [options]        fine-tune (default: the embedded MiniLM + VADER demo)
jaxtl finetune --preset digits  EfficientNet-Lite0 (ImageNet) -> handwritten digits
jaxtl sweep                     one run per learning rate x weight decay x seed
jaxtl lr-find                   the learning-rate range test
jaxtl adapt                     domain adaptation: source-only, AdaBN, Tent, CORAL and DANN
jaxtl evaluate RUN_DIR          re-score a finished run's best checkpoint
jaxtl export RUN_DIR OUT        write a run's model in its source format (or --adapters: PEFT)
jaxtl generate                  continue text prompts with a causal LM or a causal_lm run
jaxtl wise-ft RUN_DIR           WiSE-FT: the best mix of pretrained and fine-tuned weights
jaxtl soup RUN_DIR...           uniform and greedy model soups of runs of one model
jaxtl rank                      score candidate models on a task before fine-tuning any
jaxtl inspect MODEL_DIR         param tree summary and what a recipe would freeze

The package: ``parser.py`` (every flag), ``options.py`` (flags -> library options),
``training.py`` (the commands that train), ``runs.py`` (the commands that read a model or a
run), and :func:`main` here (dispatch, and the exit codes: 2 for bad input, 1 for a run that
diverged or could not save, 3 for negative transfer with ``--fail-on-negative-transfer``).
"""

from __future__ import annotations

import sys

from jaxtl.cli.options import enable_compilation_cache
from jaxtl.cli.parser import build_parser
from jaxtl.cli.runs import (
    evaluate_command,
    export_command,
    generate_command,
    inspect_command,
    rank_command,
    soup_command,
    wise_ft_command,
)
from jaxtl.cli.training import adapt_command, finetune_command, lr_find_command, sweep_command
from jaxtl.train import heap

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    heap.limit_arenas()  # before the threads of XLA's runtime exist (jaxtl.train.heap)
    args = build_parser().parse_args(argv)
    args.argv = argv
    enable_compilation_cache()
    handler = {
        "finetune": finetune_command,
        "evaluate": evaluate_command,
        "export": export_command,
        "wise-ft": wise_ft_command,
        "soup": soup_command,
        "inspect": inspect_command,
        "rank": rank_command,
        "sweep": sweep_command,
        "lr-find": lr_find_command,
        "adapt": adapt_command,
        "generate": generate_command,
    }[args.command]
    try:
        if getattr(args, "distributed", False):
            if not args.out:
                raise ValueError(
                    "distributed (--distributed) needs --out: every process must write the "
                    "same run directory (on a filesystem they all see), and a default "
                    "timestamped name could differ between them."
                )
            from jaxtl import distributed

            distributed.initialize()
        return handler(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        # Expected user errors: one clear line, no traceback. Bugs still raise.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from jaxtl.checkpoint import CheckpointWriteError
        from jaxtl.train.faults import NonFiniteStepsError, OutputWriteError

        # A run that diverged or could not save: what happened, what is kept, what to try.
        # An output that could not be written (a path checked before the work but changed
        # since, a full disk): one line too.
        if isinstance(e, NonFiniteStepsError | CheckpointWriteError | OutputWriteError | OSError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
