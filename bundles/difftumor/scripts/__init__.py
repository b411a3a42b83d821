"""Scripts of the difftumor bundle: only what MONAI core lacks (each module's docstring says why).

The modules import each other relatively, and nothing here depends on the package being called ``scripts``: the
collection's tools import this folder under another name (e.g. ``difftumor_scripts``) to put
``transforms.TumorSynthesisd`` inside seg_unet3d's training, next to that bundle's own ``scripts``.
"""
