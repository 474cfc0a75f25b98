"""Training recipes shipped with the package (``demo.yaml``: the tiny model's, also at configs/demo.yaml)."""
