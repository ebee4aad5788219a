"""MONAI Label integration: the app in ``fusion_app/`` (run by MONAI Label from its own environment, see
``docs/monailabel.md``), the integration-test helper and the input stacking tool. Nothing here is imported by the
bundle's workflows; ``fusion_app/lib/pipeline.py`` is also importable from the project venv (its tests)."""
