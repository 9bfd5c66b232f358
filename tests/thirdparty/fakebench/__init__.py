"""A stand-in for robustbench.utils.load_model's calling convention."""
