"""Jobs behind the CLI: one module per command (a ``Params`` dataclass, ``add_args``, ``run``,
``main``), the job directory (:mod:`.jobdir`) and the refinement loop (:mod:`.loop`)."""
