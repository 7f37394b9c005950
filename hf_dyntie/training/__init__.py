"""The training wing: what trains a DynTie model, and nothing a saved model needs to load.

``trainer.py`` (DynTieTrainer, the Trainer's hooks; its save and load hooks in ``trainer_files.py``), ``training_args.py`` (the tie_* arguments, checked once),
``start.py`` (where a run starts), ``policies/`` (who decides the ties; their options in ``options.py``),
``scoring.py`` (held-out scores of candidate maps), ``history.py`` (decision records, checkpoints' tying state),
``checkpoints.py`` (which checkpoint a run may resume from, checked before any data work), ``saving.py``
(atomic saves, a full disk said in one line), ``optimizer_state.py`` (AdamW's moments follow a retie),
``compiling.py``, ``nonfinite.py``, ``accounting.py``, ``plotting.py`` and ``model_card.py``. The model side
(configuration, modeling, tying, tie_map, families, placement, sharding: what remote code carries) never imports
from here; ``tests/test_layout.py`` keeps it so.
"""
