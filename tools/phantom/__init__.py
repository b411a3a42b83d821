"""A procedural abdominal CT phantom in Hounsfield units with pancreas / tumor labels and a full organ map.

No real data set can be shipped or downloaded, so this is what the demo and the tests train on (SPEC 2.2).
"""

from tools.phantom.anatomy import ORGAN_LABELS, SKELETAL_MUSCLE_IDS, SUBCUTANEOUS_FAT_IDS, Tissue
from tools.phantom.appearance import PHASES, TISSUE_HU
from tools.phantom.case import PhantomCase, make_case
from tools.phantom.dataset import make_dataset, plan_cases

__all__ = [
    "ORGAN_LABELS",
    "PHASES",
    "PhantomCase",
    "SKELETAL_MUSCLE_IDS",
    "SUBCUTANEOUS_FAT_IDS",
    "TISSUE_HU",
    "Tissue",
    "make_case",
    "make_dataset",
    "plan_cases",
]
