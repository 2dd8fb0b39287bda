"""The probes' protocol values, importable without torch (the commands show them in --help and check their
flags before anything heavy is imported); the probe modules read them from here."""

# DINOv2's learning rates (eval/linear.py), scaled by batch / 256 as it scales them
LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
WEIGHT_DECAYS = (0.0, 1e-4)
MIN_STEPS = 12_500  # DINOv2's 10 x 1,250 iterations
# MSN's few-shot (logistic_eval.py): images per class, draws, lambda (divided by the images drawn)
SHOTS = (1, 2, 5, 10)
SEEDS = (0, 1, 2)
LAMBDA = 0.00025
TOL = 1e-3  # MSN stops cyanure at a relative duality gap of 1e-3 (logistic_eval.py: tol=1e-3)
MAX_ITERATIONS = 300  # and after 300 epochs (max_epochs=300); here L-BFGS iterations over the drawn images


def default_store_dir() -> str:
    """Where feature stores go without --cache."""
    import os

    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "d2v_plugin", "features")
