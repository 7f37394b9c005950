"""The example scripts' stages: what ``run_clm_dyntie.py`` and ``run_mlm_dyntie.py`` share.

The two scripts follow transformers' ``run_clm.py`` / ``run_mlm.py`` (same flags, same three argument
dataclasses, same data processing) and differ only in the task: the model head, how a batch is labelled and
what "accuracy" means. Each stage of a script has one module here, so a reader of a script opens one file
per stage:

- ``arguments.py``  the argument dataclasses, parsing, and every check that needs no model or data
- ``machine.py``    logging, CPU threads, and what the launcher started (one process or many)
- ``output_dir.py`` the output folder: refused when unwritable or holding another run, cleared only at the end
- ``models.py``     tokenizer, config and model; the tying arguments and the checkpoint to resume, checked
- ``data.py``       raw datasets, tokenization, blocks, the masked-LM evaluation set and collator
- ``results.py``    metrics, train / evaluate / save, ``all_results.json``
- ``quickstart.py`` the offline quickstart (``python run_clm_dyntie.py`` without arguments)

Nothing outside ``scripts/`` imports this package: the library (``hf_dyntie``) never depends on it.

Bad input is reported as a :class:`UsageError`: :func:`run_script` prints it as one line on stderr and exits
with status 2, and every check that can fail runs before any data work starts (the tying arguments are
checked against the model right after it is built, before tokenization). A run whose training loss turns
NaN or infinite stops with one ``error:`` line too, and exit status 3; a disk that fills during a save with
one line saying what is still whole, and exit status 4.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..training.checkpoints import CheckpointError
from ..training.nonfinite import NonFiniteLossError
from ..training.saving import DiskFullError


class UsageError(Exception):
    """Bad input (arguments, files, model/tokenizer mismatch): reported as one line, exit status 2."""


EXIT_USAGE = 2  # bad input, found before any data work (argparse's status for usage errors)
EXIT_DIVERGED = 3  # the training loss turned NaN or infinite: stopped, nothing saved from the bad step
EXIT_DISK_FULL = 4  # the disk filled during a save: what was whole before is whole


def run_script(main: Callable[[], None]) -> None:
    """Entry point of a script: run ``main``. A :class:`UsageError` (or a checkpoint that cannot be resumed)
    becomes ``error: ...`` on stderr and exit status 2; a diverged run (:class:`NonFiniteLossError`) the same
    with exit status 3, a disk that filled during a save (:class:`DiskFullError`) with exit status 4."""
    try:
        main()
    except (UsageError, CheckpointError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except NonFiniteLossError as err:
        print(f"\nerror: {first_line(err)}", file=sys.stderr)  # on its own line, after the progress bar
        sys.exit(EXIT_DIVERGED)
    except DiskFullError as err:
        print(f"\nerror: {err.strerror}", file=sys.stderr)
        sys.exit(EXIT_DISK_FULL)
    close_process_group()


def close_process_group() -> None:
    """Destroy the process group (torchrun, accelerate) when a run has ended cleanly: gloo's worker threads left
    to interpreter shutdown can abort a finished rank ('terminate called without an active exception', seen on a
    two-process evaluation). Not after an error: a rank that failed alone would wait in the teardown for the
    others. torch is not imported for this (a run that never used it has no group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
