"""The names of the device-mesh axes, the only place they are spelled (the model's kernels shard
over them, `training/sharding.py` builds meshes with them).

  "data"      pure data parallelism;
  "fsdp"      data parallelism with parameters and optimizer state sharded, gathered per layer;
  "sequence"  context parallelism: one sequence split along its length.
Batches are sharded over BATCH_AXES; each device's long convolutions then run over whole
sequences, so FFTs stay device-local.
"""

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
SEQUENCE_AXIS = "sequence"
AXES = (DATA_AXIS, FSDP_AXIS, SEQUENCE_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
