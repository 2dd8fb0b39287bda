"""d2v_plugin: a fairseq user dir for fine-tuning Data2Vec2 image encoders on image classification.

Loaded as fairseq's user dir (``common.user_dir=d2v_plugin``), it registers the task
``image_folder_classification``, the model ``data2vec2_image_classifier`` and the criterion
``mixup_cross_entropy`` and the optimizer ``fused_adamw``. Imported on its own (a command's ``--help``, a Python session) it stays light
until used: ``d2v_plugin.load_classifier(path)`` loads a fine-tuned model; ``d2v_plugin.register()``
registers the names with fairseq for its own APIs (``checkpoint_utils.load_model_ensemble``, ...).
"""
import sys

import d2v_plugin_quiet  # noqa: F401  (known harmless third-party warnings, silenced by name)


def register() -> None:
    """Register the plugin's task, model and criterion with fairseq and install its fixes to fairseq's
    behaviour (d2v_plugin/compat.py). Idempotent."""
    with d2v_plugin_quiet.fairseq_root_logging_undone():
        import fairseq  # noqa: F401
    import d2v_plugin.criterions  # noqa: F401
    import d2v_plugin.compat
    import d2v_plugin.models  # noqa: F401
    import d2v_plugin.optim  # noqa: F401
    import d2v_plugin.tasks.image_folder_classification  # noqa: F401

    d2v_plugin.compat.install()


def __getattr__(name):
    if name == "load_classifier":
        with d2v_plugin_quiet.fairseq_root_logging_undone():
            from d2v_plugin.inference import load_classifier
        return load_classifier
    raise AttributeError(f"module 'd2v_plugin' has no attribute {name!r}")


# fairseq imports its user dir after importing itself: then register, as fairseq expects of a user dir
if "fairseq" in sys.modules:
    register()
