"""Several processes: collectives over the ranks (all-reduce, broadcast) and FSDP2's sharded (DTensor) weights."""
