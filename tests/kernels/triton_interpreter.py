"""Whether this process runs Triton kernels in the interpreter."""


def interpreter_ready() -> bool:
    """Whether triton, its language library included, was imported in interpreter mode."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.cumsum, InterpretedFunction)
