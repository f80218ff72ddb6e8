"""Scipion protocols for cryocv (see issue: Scipion plugin)."""
