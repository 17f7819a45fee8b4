"""Graph passes: each module exposes one pass with the PassResult contract (see msfp_compiler.pass_manager)."""
