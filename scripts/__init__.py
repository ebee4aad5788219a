"""ClinicalFMamba bundle code, imported as ``scripts.*`` from the bundle root (MONAI convention)."""
