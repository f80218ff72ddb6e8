"""Scipion viewers for cryocv (see issue: Scipion plugin)."""
