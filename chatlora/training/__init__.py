"""The training side: ``train`` (a run on the HF Trainer: data, split, encoded examples, Trainer, adapter and run
card), ``plan`` (speed-ups, micro-batches and the memory fit, decided before weights load), ``kernels`` (the
label-only LM head, Liger) and ``rundir`` (the output folder and its checkpoints). The inference side and the commands
never import it; import its modules by name (``chatlora.training.train``).
"""
