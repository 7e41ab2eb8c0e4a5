"""Activation memory of a training step, measured the same way by every benchmark."""
import torch


def saved_bytes(run, held):
    """Run ``run()`` and return (bytes of the distinct tensors autograd saved for backward, its
    result). ``held`` (the input) is left out: the caller holds it either way."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    seen.pop(held.untyped_storage().data_ptr(), None)
    return sum(seen.values()), out
