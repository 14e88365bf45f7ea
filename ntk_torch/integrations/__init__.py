"""Where users already work: the tracker wired into TensorBoard (:mod:`.tensorboard`) and
Lightning (:mod:`.lightning`).

Each integration imports its optional library only when used; a missing one is an
``ImportError`` naming the extra to install (``pip install 'ntk-torch[tensorboard]'``).
"""
