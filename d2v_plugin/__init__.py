"""d2v_plugin: a fairseq user dir for fine-tuning Data2Vec2 image encoders on image classification.

Importing it registers the task ``image_folder_classification``, the model
``data2vec2_image_classifier`` and the criterion ``mixup_cross_entropy``.
"""
import d2v_plugin.models  # noqa: F401
