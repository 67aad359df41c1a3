"""Running on many devices and hosts.

`sharding`: the device mesh and the shardings of states and batches;
`distributed`: multi-process initialisation (SLURM, TPU pods, explicit);
`hostmem`: the host allocator's tuning, set before JAX starts.
"""
