"""The inference side: ``infer`` (``ChatModel``: a run or model loaded through ``chatlora.run``, prompts rendered
through the training template, replies generated, streamed and batched) and ``chat`` (the interactive chat). It never
imports the training side; import its modules by name (``chatlora.inference.infer``).
"""
