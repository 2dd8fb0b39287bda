"""Every way of measuring a model, in one part that the commands (d2v_plugin/cli) call:

- ``runtime``: the device, the precision and the ranks (torch.distributed under torchrun or srun);
- ``loop``: a split's batches in the model's input form, this rank's shard, on the device one ahead;
- ``features``: features of any block and pooling, extracted into a resumable store on disk;
- ``knn``, ``linear``, ``fewshot``: one probe a module, each on cached features;
- ``benchmarks``: the label mappings of other ImageNet sets;
- ``metrics``: top-k counting and the definition of every metric, shared with the criterion's
  validation and with ``cli.compare``'s log reader.

Importing this package imports none of them (the criterion needs only ``metrics``).
"""
