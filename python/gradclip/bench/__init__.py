"""gradclip's benchmark suite: ``python -m gradclip bench`` / ``gradclip-bench``.

Modules: :mod:`.workloads` (gradient shape sets from architecture formulas),
:mod:`.ceilings` (this machine's bandwidth ceilings), :mod:`.timing` (fair,
interleaved timing), :mod:`.competitors`, :mod:`.runner`, :mod:`.report`,
:mod:`.plot` and :mod:`.cli`. Needs PyTorch (gradclip itself does not); the
plots need matplotlib (the ``[bench]`` extra). Importing this package imports
neither.
"""
