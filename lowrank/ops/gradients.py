"""Gradients by name for lowrank's autograd Functions, so that adding an input to an op cannot
shift a gradient onto the wrong one."""

import inspect


class InputGradients:
    """The inputs of a ``torch.autograd.Function``'s forward, by name, for its backward: which of
    them autograd wants a gradient for (``needed``), and the tuple it expects, built from
    {name: gradient} (``by_position``).

    Built once per Function, at import, from forward's signature: a differentiable input that
    forward does not have is an error then."""

    def __init__(self, function, *differentiable):
        self.inputs = tuple(inspect.signature(function.forward).parameters)[1:]  # after ctx
        unknown = [name for name in differentiable if name not in self.inputs]
        if unknown:
            raise TypeError(f"{function.__name__}.forward has no inputs {unknown}; its inputs "
                            f"are {list(self.inputs)}")
        self.differentiable = differentiable

    def needed(self, ctx):
        """{differentiable input: whether autograd wants its gradient}."""
        return {name: ctx.needs_input_grad[self.inputs.index(name)]
                for name in self.differentiable}

    def by_position(self, **gradients):
        """One gradient per input of forward, in its order: those given, None for the rest."""
        for name in gradients:
            if name not in self.differentiable:
                raise TypeError(f"a gradient for {name!r}, which is not among the differentiable "
                                f"inputs {list(self.differentiable)}")
        return tuple(gradients.get(name) for name in self.inputs)
