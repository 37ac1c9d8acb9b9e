"""Tensor (intra-layer) parallelism, Megatron-LM's: the layers of a plan split across the T ranks of a tensor group.

  layers  the split layers (column- and row-parallel Dense, attention by heads, Embedding by vocabulary)
  plan    which layers to split: automatic, or the user's plan checked against the model
  shard   the whole model made tensor-parallel (every slice from the whole model's initial weights), and back

Ranks are numbered t = rank % T, stage = (rank // T) % P, replica = rank // (P * T) (see world.World); the split
layers' all-reduces run on the tensor group's Horovod process set (backend/tensor_ops.py).
"""
