"""d2v_plugin: a fairseq user dir for fine-tuning Data2Vec2 image encoders on image classification.

Importing it registers the task ``image_folder_classification``, the model
``data2vec2_image_classifier`` and the criterion ``mixup_cross_entropy``.
"""
import d2v_plugin.criterions  # noqa: F401
import d2v_plugin.fairseq_patches
import d2v_plugin.models  # noqa: F401
import d2v_plugin.tasks.image_folder_classification  # noqa: F401
from d2v_plugin.inference import load_classifier  # noqa: F401

d2v_plugin.fairseq_patches.install()  # checkpoint_last.pt / checkpoint_best.pt copies become atomic
