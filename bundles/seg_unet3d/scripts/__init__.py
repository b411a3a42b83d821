"""Code of the seg_unet3d bundle that MONAI core does not provide (each module's docstring says why).

- ``checkpointing``: vendored copy of ``tools/bundle_scripts/checkpointing.py`` (atomic resumable checkpoints, NaN
  stop); never edit it here.
- ``data``: the training / validation / test split of an MSD ``dataset.json`` or a datalist JSON, by patient, with
  real:synthetic mixing.
- ``seg_metrics``: per-case Dice / NSD / HD95 on the original grid, lesion-level detection per size bin, patient-level
  specificity, CSV writing; plain functions that ``tools`` reuses.
- ``postprocess``: the lesion-level decision rule of the tumor output (tumor components below a mean tumor
  probability lose the tumor class), which MONAI's argmax / size filters cannot express.
- ``handlers``: the evaluation report handler, the checkpoint / resume handlers that add the trainer at attach time,
  the end-of-run handler for resumable state, and the offline MLflow store URI.

Modules import each other relatively so the package can be loaded under another name.
"""
