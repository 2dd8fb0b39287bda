"""fairseq optimizers of the plugin (fairseq does not auto-import a user dir's optim/)."""
from d2v_plugin.optim.fused_adamw import FusedAdamW  # noqa: F401 (registers the optimizer)
from d2v_plugin.optim.lars import Lars  # noqa: F401 (registers the optimizer)
