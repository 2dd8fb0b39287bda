"""Models: the plain-PyTorch encoder, checkpoint reading, and the fairseq classifier."""
from d2v_plugin.models.classifier import Data2Vec2ImageClassifier  # noqa: F401 (registers the model)
