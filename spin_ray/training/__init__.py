"""The training math, without Ray: the SPIN loss, the chat template and varlen packing, micro-batching, the
optimizer step (`Trainer`), checkpoints and the memory model that sizes a step."""
