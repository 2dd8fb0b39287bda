"""fairseq criterions of the plugin (fairseq does not auto-import a user dir's criterions/)."""
from d2v_plugin.criterions.mixup_cross_entropy import MixupCrossEntropyCriterion  # noqa: F401
