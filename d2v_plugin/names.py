"""The names other tools rely on (DESIGN.md "Names"), and the formats of the files the plugin writes."""
TASK_NAME = "image_folder_classification"
MODEL_NAME = "data2vec2_image_classifier"
CRITERION_NAME = "mixup_cross_entropy"

COMPACT_FORMAT = "d2v_plugin_encoder"  # cli.convert's encoder file: weights + architecture
EXPORT_FORMAT = "d2v_plugin_classifier"  # cli.export's folder: model.safetensors + config.json

DATA2VEC_PRETRAINING_MODEL = "data2vec_multi"  # data2vec 2.0's pretraining model in fairseq
DATA2VEC_CLASSIFIER = "mae_image_classification"  # data2vec's own fine-tuning model
