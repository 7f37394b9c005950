"""The machine a script runs on: logging, CPU threads, and what the launcher started (one process or many).

``fit_to_machine`` sizes a CPU run to the idle cores; ``warn_if_one_process_was_started`` says when
``accelerate launch --cpu`` ignored ``--num_processes``.
"""

from __future__ import annotations

import logging
import os
import sys

import datasets
import torch
import transformers

from ..training.training_args import DynTieTrainingArguments

logger = transformers.utils.logging.get_logger(__name__)


def setup_logging(training_args: DynTieTrainingArguments) -> None:
    """Log like transformers' scripts: to stdout, at the level the training arguments ask for."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def cpu_threads(cores: int, load: float, processes: int, default: int) -> int:
    """Math threads per process: the idle cores (``cores`` minus the 1-minute ``load``, at least one) shared
    among this machine's ``processes``, never more than torch's ``default``."""
    idle = max(1, round(cores - load))
    return max(1, min(default, idle // max(1, processes)))


def fit_to_machine(training_args: DynTieTrainingArguments) -> None:
    """CPU runs: no pinned memory (it only speeds up copies to a GPU, and torch warns about it on every
    DataLoader), and, unless ``OMP_NUM_THREADS`` is set, as many math threads as there are idle cores.

    On a CPU that other processes keep busy, torch's default (one thread per core) makes its threads wait
    for each other: one thread per idle core is several times faster there, and the same on an idle machine.
    The choice is printed in one line.

    Several processes: transformers' ``average_tokens_across_devices`` (on by default) scales each rank's loss
    by the world size, which is right for the gradients of a training step but doubled the masked-LM
    *evaluation* loss at world size 2 (12.18 against one process's 6.10); the scripts turn it off, so every
    process count reports the same loss."""
    if training_args.world_size > 1 and training_args.average_tokens_across_devices:
        training_args.average_tokens_across_devices = False
    if training_args.device.type != "cpu":
        return
    training_args.dataloader_pin_memory = False
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]  # processes wanting a core, averaged over the last minute
    except (AttributeError, OSError):  # not on every platform
        load = 0.0
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = cpu_threads(cores, load, processes, torch.get_num_threads())
    torch.set_num_threads(threads)
    if training_args.should_log:
        share = f", {processes} processes" if processes > 1 else ""
        print(f"CPU threads: {threads} per process ({cores} cores, load {load:.1f}{share}); set OMP_NUM_THREADS to choose")


def processes_asked_of_accelerate() -> int | None:
    """How many processes ``accelerate launch`` was asked for when it started this one with its one-process
    launcher (``--cpu`` makes it ignore ``--num_processes``): read from the launcher's command line, since it
    passes the number on to no variable. None when that launcher did not start us (or ``/proc`` is absent)."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:
        return None
    try:
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else None
        if arg == "--num_processes" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None and value.isdigit():
            return int(value)
    return None


def warn_if_one_process_was_started(script: str) -> None:
    """``accelerate launch --num_processes 2 --cpu`` trains in one process without a word; say so, and how to
    start two."""
    asked = processes_asked_of_accelerate()
    if asked is not None and asked > 1:
        logger.warning(
            f"accelerate launch --cpu started one process, not the {asked} asked for (--num_processes); this run "
            f"trains in one. For {asked} CPU processes: accelerate launch --multi_gpu --num_processes {asked} "
            f"{script} ... --use_cpu (or torchrun --nproc_per_node {asked} {script} ... --use_cpu)"
        )
