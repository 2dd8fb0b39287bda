"""For the tests, the demo and the benchmarks: checkpoints written in data2vec's own layout, and
data2vec's own model code (fairseq's examples/data2vec) made importable. Never used by training."""
