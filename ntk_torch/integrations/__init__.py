"""Where users already work: the tracker wired into TensorBoard (:mod:`.tensorboard`),
Lightning (:mod:`.lightning`) and the Hugging Face Trainer (:mod:`.transformers`).

Each integration imports its optional library only when used; a missing one is an
``ImportError`` naming the extra to install (``pip install 'ntk-torch[tensorboard]'``).
"""
